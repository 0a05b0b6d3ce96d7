"""DVC stage `evaluate`: every training's best.pt + the test split -> metrics/."""

import json
import logging
from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae.commands.entry import data_option, models_option, params_option, run
from aevae.config.load import load_params
from aevae.evaluate.params import load_eval_params
from aevae.evaluate.stage import evaluate
from aevae.results.metrics_dir import MetricsDir

log = logging.getLogger("evaluate")


@click.command()
@params_option
@data_option
@models_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the metric files.")
def main(params_file: str, data_dir: str, models_dir: str, out: str) -> None:
    """Reconstruct the test split with the best checkpoint of every training of the study (each
    configuration under models: in params.yaml, each seed in train.seeds) and score every image with PSNR,
    SSIM, LPIPS and MSE; write eval.json, per_image.csv, per_seed.csv, summary.csv and the reconstructions,
    and log them to MLflow."""
    result = evaluate(load_params(params_file), load_eval_params(params_file), Path(data_dir), Path(models_dir),
                      MetricsDir(Path(out)))
    log.info("test metrics: %s", json.dumps(result))


if __name__ == "__main__":
    run(main)
