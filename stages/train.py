"""DVC stage `train@<configuration>-<seed>`: data/prepared -> models/<configuration>/seed<seed>/."""

from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae.commands.entry import data_option, models_option, params_option, run
from aevae.config.load import load_params
from aevae.files.model_dir import ModelDir
from aevae.train.stage import train


@click.command()
@click.option("--model", "config", required=True,
              help="The model configuration to train: a key under models: in params.yaml.")
@click.option("--seed", type=int, required=True, help="The training seed (one of train.seeds).")
@params_option
@data_option
@models_option
def main(config: str, seed: int, params_file: str, data_dir: str, models_dir: str) -> None:
    """Train one model configuration with one seed; write its checkpoints, history and MLflow run id to
    <models>/<configuration>/seed<seed>/, and log the run to MLflow (MLFLOW_TRACKING_URI, or mlflow.db at
    the repository root)."""
    train(load_params(params_file), Path(data_dir), ModelDir.of(Path(models_dir), config, seed))


if __name__ == "__main__":
    run(main)
