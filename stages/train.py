"""DVC stage `train@<configuration>-<seed>`: data/prepared -> models/<configuration>/seed<seed>/."""

from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae import AevaeError
from aevae.commands.entry import data_option, models_option, params_option, run
from aevae.config.load import load_params
from aevae.files.model_dir import ModelDir
from aevae.train.stage import read_tuned, train


@click.command()
@click.option("--model", "config", required=True,
              help="The model configuration to train: a key under models: in params.yaml.")
# Text, not int: params.yaml is checked first, so `train.seeds: [a]` is named as such, not as a bad --seed.
@click.option("--seed", required=True, help="The training seed: one of train.seeds.")
@click.option("--tuned", "tuned_file", type=click.Path(dir_okay=False),
              help="The settings tune@<configuration> chose (tuned/<configuration>.json); without it, params.yaml's.")
@params_option
@data_option
@models_option
def main(config: str, seed: str, tuned_file: str | None, params_file: str, data_dir: str, models_dir: str) -> None:
    """Train one model configuration with one seed; write its checkpoints, history and MLflow run id to
    <models>/<configuration>/seed<seed>/, and log the run to MLflow (MLFLOW_TRACKING_URI, or mlflow.db at
    the repository root)."""
    params = load_params(params_file)
    if seed not in map(str, params.train.seeds):
        raise AevaeError(f"--seed {seed}: not one of train.seeds {params.train.seeds} in {params_file}; the "
                         "stages of dvc.yaml train each seed listed there")
    settings = read_tuned(Path(tuned_file), config) if tuned_file else None
    train(params, Path(data_dir), ModelDir.of(Path(models_dir), config, int(seed)), settings=settings)


if __name__ == "__main__":
    run(main)
