"""DVC stage `train@<configuration>-<seed>`: data/prepared -> models/<configuration>/seed<seed>/."""

import sys
from pathlib import Path

# This checkout's aevae, not an installed copy: inside `dvc exp run` the stage runs in DVC's copy of the
# commit under test, and must run that commit's code.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import click  # noqa: E402

from aevae.cli import data_option, models_option, params_option, run  # noqa: E402
from aevae.files import ModelDir  # noqa: E402
from aevae.params import load_params  # noqa: E402
from aevae.train import train  # noqa: E402


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
