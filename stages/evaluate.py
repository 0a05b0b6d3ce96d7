"""DVC stage `evaluate`: each model's best.pt + the test split -> metrics/."""

import json
import logging
from pathlib import Path

import click

from aevae.cli import params_option, run
from aevae.files import MetricsDir, ModelDir
from aevae.metrics import evaluate
from aevae.params import load_params

log = logging.getLogger("evaluate")


@click.command()
@params_option
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder of the prepare stage.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the metric files.")
@click.argument("models", nargs=-1, required=True, type=click.Path(file_okay=False))
def main(params_file: str, data_dir: str, out: str, models: tuple[str, ...]) -> None:
    """Reconstruct the test split with the best checkpoint in each MODELS folder and score every image
    with PSNR, SSIM and LPIPS; write eval.json, per_image.csv, summary.csv and the reconstructions, and
    log them to the models' MLflow runs."""
    params = load_params(params_file)
    result = evaluate(params, Path(data_dir), [ModelDir(Path(m)) for m in models], MetricsDir(Path(out)))
    log.info("test metrics: %s", json.dumps(result))


if __name__ == "__main__":
    run(main)
