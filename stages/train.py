"""DVC stages `train_<model>`: data/prepared -> models/<model>/."""

from pathlib import Path

import click

from aevae.cli import params_option, run
from aevae.files import ModelDir
from aevae.models import MODEL_KINDS
from aevae.params import load_params
from aevae.train import train


@click.command()
@click.option("--model", "kind", type=click.Choice(MODEL_KINDS), required=True, help="Which model to train.")
@params_option
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder of the prepare stage.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder for best.pt, last.pt, history.csv and run.json.")
def main(kind: str, params_file: str, data_dir: str, out: str) -> None:
    """Train one model; write its checkpoints, history and MLflow run id to --out, and log the run to
    MLflow (MLFLOW_TRACKING_URI, or mlflow.db at the repository root)."""
    params = load_params(params_file)
    train(kind, params, Path(data_dir), ModelDir(Path(out)))


if __name__ == "__main__":
    run(main)
