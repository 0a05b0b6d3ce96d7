"""The `aevae` command: what users run besides the pipeline (which runs with `dvc repro`)."""

from __future__ import annotations

import click

from aevae import AevaeError
from aevae.cli import run


@click.group()
@click.version_option(package_name="aevae")
def aevae() -> None:
    """aevae: AutoEncoder vs VAE experiments. The pipeline itself runs with `dvc repro`."""


@aevae.command()
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table to this CSV file.")
@click.option("--experiment", default="aevae", show_default=True, help="MLflow experiment name.")
def compare(csv_path: str | None, experiment: str) -> None:
    """Compare every AE and VAE run in the MLflow store (MLFLOW_TRACKING_URI, or mlflow.db here):
    DVC experiment, key params and test metrics, one row per run."""
    import pandas as pd

    from aevae import tracking

    table = tracking.compare_runs(experiment)
    if table.empty:
        raise AevaeError(f"no ae/vae runs in experiment '{experiment}' of {tracking.tracking_uri()}: run dvc repro first")
    with pd.option_context("display.max_columns", None, "display.width", 200, "display.float_format", "{:.4f}".format):
        click.echo(table.to_string(index=False))
    if csv_path:
        table.to_csv(csv_path, index=False)
        click.echo(f"wrote {csv_path}", err=True)


def main() -> None:
    """Entry point of the `aevae` command."""
    run(aevae)
