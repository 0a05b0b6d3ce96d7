"""DVC stage `features`: the test split -> its Inception-v3 features for FID/KID (once per data version)."""

from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae.commands.entry import data_option, params_option, run
from aevae.config.load import load_params
from aevae.evaluate.features import extract_test_features
from aevae.evaluate.params import load_eval_params


@click.command()
@params_option
@data_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: features.npy (N x 2048 float32, test order) and inception.json.")
def main(params_file: str, data_dir: str, out: str) -> None:
    """Extract the Inception-v3 pool features of the test images, the reference set of every FID and KID
    the evaluation computes. eval.fid decides whether they are computed (auto: on CUDA only); when they
    are not, inception.json says why, how to turn them on, and the extractor's measured cost per image."""
    extract_test_features(load_params(params_file), load_eval_params(params_file), Path(data_dir), Path(out))


if __name__ == "__main__":
    run(main)
