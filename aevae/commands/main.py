"""The `aevae` command: what users run besides the pipeline (which runs with `dvc repro`)."""

from __future__ import annotations

import click

from aevae.commands.compare import compare, rate_distortion
from aevae.commands.entry import run
from aevae.commands.inference import reconstruct, sample
from aevae.commands.slurm import slurm
from aevae.commands.tracking import sync, ui


@click.group()
@click.version_option(package_name="aevae")
def aevae() -> None:
    """aevae: AutoEncoder vs VAE experiments. The pipeline itself runs with `dvc repro`; these commands
    read what its runs logged to MLflow (MLFLOW_TRACKING_URI, or mlflow.db here), apply a trained model to
    your own images, and run the study on a Slurm cluster."""


for command in (compare, rate_distortion, reconstruct, sample, ui, sync, slurm):
    aevae.add_command(command)


def main() -> None:
    """Entry point of the `aevae` command."""
    run(aevae)
