"""DVC stage `evaluate`: every training's best.pt + the test split -> metrics/."""

import sys
from pathlib import Path

# This checkout's aevae, not an installed copy: inside `dvc exp run` the stage runs in DVC's copy of the
# commit under test, and must run that commit's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402
import logging  # noqa: E402

import click  # noqa: E402

from aevae.cli import data_option, models_option, params_option, run  # noqa: E402
from aevae.files import MetricsDir  # noqa: E402
from aevae.metrics import evaluate  # noqa: E402
from aevae.params import load_params  # noqa: E402

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
    result = evaluate(load_params(params_file), Path(data_dir), Path(models_dir), MetricsDir(Path(out)))
    log.info("test metrics: %s", json.dumps(result))


if __name__ == "__main__":
    run(main)
