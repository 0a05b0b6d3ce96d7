"""DVC stage `prepare`: images -> data/prepared/{train,val,test}.npy + manifest.json + test_units.csv."""

import logging
from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae.commands.entry import params_option, run
from aevae.config.load import load_params
from aevae.data.params import load_data_params
from aevae.data.prepare import prepare

log = logging.getLogger("prepare")


@click.command()
@params_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the split arrays and manifest.json (replaced only on success).")
def main(params_file: str, out: str) -> None:
    """Decode, crop and resize images (data.source: builtin or folder), split them into train/val/test
    with the seed, keeping each group of files (data.groups) in one split, and write uint8 arrays, the
    test images' independent units and a manifest."""
    seed, data = load_params(params_file).seed, load_data_params(params_file)
    prepared = prepare(data, seed, Path(out))
    log.info("wrote %s: %s images, %d files skipped, sha256 %s", out, prepared.counts, len(prepared.skipped),
             prepared.sha256[:12])
    if prepared.grouping and data.grouped:
        log.info("groups (data.groups: %s) per split: %s; the fractions asked for %s images", prepared.grouping["by"],
                 prepared.grouping["counts"], prepared.targets)
    _warn_near_duplicates(prepared.near_duplicates, data.grouped)
    for skipped in prepared.skipped[:10]:
        log.warning("skipped %s: %s", skipped["path"], skipped["reason"])
    if len(prepared.skipped) > 10:
        log.warning("... and %d more; all are listed in %s/manifest.json", len(prepared.skipped) - 10, out)


def _warn_near_duplicates(found: dict | None, grouped: bool) -> None:
    if not found or not found["found"]:
        return
    pair = found["examples"][0]
    hint = ("some groups hold copies of one picture: check data.groups" if grouped else
            "if the files come in groups (an identity's photos, a video's frames, crops of one picture), "
            "set data.groups: folder or a CSV")
    log.warning("%d of %d test images checked have a near-duplicate in the training split (>= %g dB PSNR on "
                "%dpx thumbnails; e.g. test %s ~ train %s), so the test partly measures memory: %s (docs/data.md, "
                "Groups)", found["found"], found["test_checked"], found["psnr_db"], found["thumbnail_px"],
                pair["test"], pair["train"], hint)


if __name__ == "__main__":
    run(main)
