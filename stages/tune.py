"""DVC stage `tune@<configuration>`: data/prepared (train and validation only) -> tuned/<configuration>.json,
.csv and .db: the settings the study's trainings of this configuration use (none when tune.trials is 0)."""

import logging
from pathlib import Path

import _checkout  # noqa: F401 - first: this checkout's aevae
import click

from aevae import AevaeError
from aevae.commands.entry import data_option, params_option, run
from aevae.config.load import load_params
from aevae.tune.params import check_space, load_tune_params
from aevae.tune.study import TunedFiles, tune

log = logging.getLogger("tune")


@click.command()
@click.option("--model", "config", required=True, help="The model configuration to tune: a key under models:.")
@params_option
@data_option
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for <configuration>.json (the chosen settings), .csv (every trial) and .db (Optuna's).")
def main(config: str, params_file: str, data_dir: str, out: str) -> None:
    """Tune one model configuration with tune.trials trials (each the mean best validation loss of
    tune.seeds trainings) over tune.space, with Optuna's seeded TPE sampler; the test split is never read.
    tune.trials: 0 writes no settings: the study trains at params.yaml's."""
    params, settings = load_params(params_file), load_tune_params(params_file)
    if config not in params.models:
        raise AevaeError(f"--model {config}: no such configuration under models: in {params_file}")
    check_space(params, settings, params_file)
    result = tune(params, settings, config, Path(data_dir), TunedFiles(Path(out), config))
    if settings.trials:
        log.info("%s: chose %s (trial %d of %d, mean best validation loss %.6g over seeds %s)", config,
                 result["settings"], result["best_trial"], settings.trials, result["best_value"], settings.seeds)


if __name__ == "__main__":
    run(main)
