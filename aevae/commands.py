"""The `aevae` command: what users run besides the pipeline (which runs with `dvc repro`)."""

from __future__ import annotations

from pathlib import Path

import click

from aevae import AevaeError
from aevae.cli import run

param_filter = click.option(
    "--param", "where", multiple=True, metavar="KEY=VALUE",
    help="Only runs with this param (a params.yaml key, e.g. lr=0.002); repeatable.")
experiment_option = click.option("--experiment", default="aevae", show_default=True, help="MLflow experiment name.")


def _parse_where(where: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AevaeError(f"--param {item!r} is not KEY=VALUE: write e.g. --param lr=0.002")
        pairs[key] = value
    return pairs


def _echo_table(table) -> None:
    import pandas as pd

    with pd.option_context("display.max_columns", None, "display.width", 250, "display.float_format", "{:.4f}".format):
        click.echo(table.to_string(index=False))


def _runs(experiment: str, where: tuple[str, ...]):
    from aevae import tracking
    from aevae.sweeps import filter_params

    runs = tracking.model_runs(experiment)
    if runs.empty:
        raise AevaeError(f"no model runs in experiment '{experiment}' of {tracking.tracking_uri()}: run dvc repro first")
    runs = filter_params(runs, _parse_where(where))
    if runs.empty:
        raise AevaeError(f"no model run has {' and '.join(where)}: check the values with aevae compare")
    return runs


@click.group()
@click.version_option(package_name="aevae")
def aevae() -> None:
    """aevae: AutoEncoder vs VAE experiments. The pipeline itself runs with `dvc repro`; these commands
    read what its runs logged to MLflow (MLFLOW_TRACKING_URI, or mlflow.db here)."""


@aevae.command()
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table to this CSV file.")
@click.option("--by-seed", is_flag=True,
              help="Group trainings that differ only in train.seed: mean and sd across seeds, next to the "
                   "mean half-width of each run's 95% interval over test images.")
@param_filter
@experiment_option
def compare(csv_path: str | None, by_seed: bool, where: tuple[str, ...], experiment: str) -> None:
    """Compare the model runs in the MLflow store: DVC experiment, key params and test metrics, one row
    per run (or, with --by-seed, one row per model and configuration)."""
    from aevae.sweeps import run_table, seed_groups

    runs = _runs(experiment, where)
    table = seed_groups(runs) if by_seed else run_table(runs)
    _echo_table(table)
    if csv_path:
        table.to_csv(csv_path, index=False)
        click.echo(f"wrote {csv_path}", err=True)


@aevae.command("rate-distortion")
@click.option("--out", default="rate_distortion.png", show_default=True, type=click.Path(dir_okay=False),
              help="The plot; the table goes beside it with the suffix .csv.")
@param_filter
@experiment_option
def rate_distortion(out: str, where: tuple[str, ...], experiment: str) -> None:
    """Plot the VAE's distortion (test PSNR and per-pixel MSE) against its rate (test KL, nats per
    image) at each vae.beta of a sweep, mean and sd over training seeds, with the AEs as reference lines.
    Feed it with the README's beta x seed sweep."""
    import pandas as pd

    from aevae.sweeps import beta_steps, plot_rate_distortion
    from aevae.sweeps import rate_distortion as trade_off

    vae, refs = trade_off(_runs(experiment, where))
    path = Path(out)
    plot_rate_distortion(vae, refs, path)
    table = vae.assign(model="VAE")
    table = pd.concat([table, refs.rename(columns={"label": "model"})], ignore_index=True)
    table.to_csv(path.with_suffix(".csv"), index=False)
    _echo_table(table)
    for line in beta_steps(vae):
        click.echo(line)
    click.echo(f"wrote {path} and {path.with_suffix('.csv')}", err=True)


def main() -> None:
    """Entry point of the `aevae` command."""
    run(aevae)
