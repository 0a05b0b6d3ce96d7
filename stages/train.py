"""DVC stages `train_ae` and `train_vae`: data/prepared -> models/<kind>/."""

from pathlib import Path

import click

from aevae.cli import params_option, run
from aevae.models import MODEL_KINDS
from aevae.params import load_params
from aevae.train import train


@click.command()
@click.option("--model", "kind", type=click.Choice(MODEL_KINDS), required=True, help="Which model to train.")
@params_option
@click.option("--data", "data_dir", default="data/prepared", show_default=True,
              type=click.Path(file_okay=False), help="Output folder of the prepare stage.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder  [default: models/<model>]")
def main(kind: str, params_file: str, data_dir: str, out: str | None) -> None:
    """Train the AE or the VAE; write best.pt, last.pt, history.csv and run.json, and log the run
    to MLflow (MLFLOW_TRACKING_URI, or mlflow.db at the repository root)."""
    params = load_params(params_file)
    train(kind, params, Path(data_dir), Path(out or f"models/{kind}"))


if __name__ == "__main__":
    run(main)
