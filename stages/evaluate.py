"""DVC stage `evaluate`: models/*/best.pt + test split -> metrics/."""

import json
import logging
from pathlib import Path

import click

from aevae.cli import params_option, run
from aevae.metrics import evaluate
from aevae.params import load_params

log = logging.getLogger("evaluate")


@click.command()
@params_option
@click.option("--data", "data_dir", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@click.option("--models", "models_root", default="models", show_default=True, type=click.Path(file_okay=False),
              help="Folder holding ae/ and vae/ from the training stages.")
@click.option("--out", default="metrics", show_default=True, type=click.Path(file_okay=False))
def main(params_file: str, data_dir: str, models_root: str, out: str) -> None:
    """Reconstruct the test split with both best checkpoints and score every image with PSNR, SSIM and
    LPIPS; write eval.json, per_image.csv, summary.csv and the reconstructions, and log them to the
    models' MLflow runs."""
    params = load_params(params_file)
    result = evaluate(params, Path(data_dir), Path(models_root), Path(out))
    log.info("test metrics: %s", json.dumps(result))


if __name__ == "__main__":
    run(main)
