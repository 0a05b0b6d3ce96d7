"""DVC stage `prepare`: images -> data/prepared/{train,val,test}.npy + manifest.json."""

import logging
from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae.commands.entry import params_option, run
from aevae.config.load import load_params
from aevae.data.prepare import prepare

log = logging.getLogger("prepare")


@click.command()
@params_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the split arrays and manifest.json (replaced only on success).")
def main(params_file: str, out: str) -> None:
    """Decode, crop and resize images (data.source: builtin or folder), split them into
    train/val/test with the seed, and write uint8 arrays and a manifest."""
    params = load_params(params_file)
    prepared = prepare(params.data, params.seed, Path(out))
    log.info("wrote %s: %s images, %d files skipped, sha256 %s", out, prepared.counts, len(prepared.skipped),
             prepared.sha256[:12])
    for skipped in prepared.skipped[:10]:
        log.warning("skipped %s: %s", skipped["path"], skipped["reason"])
    if len(prepared.skipped) > 10:
        log.warning("... and %d more; all are listed in %s/manifest.json", len(prepared.skipped) - 10, out)


if __name__ == "__main__":
    run(main)
