"""`aevae compare` and `aevae rate-distortion`: every experiment's training runs, from the MLflow store."""

from __future__ import annotations

from pathlib import Path

import click

from aevae import AevaeError

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
    from aevae.compare.runs import filter_params, model_runs
    from aevae.tracking.store import tracking_uri

    runs = model_runs(experiment)
    if runs.empty:
        raise AevaeError(f"no model runs in experiment '{experiment}' of {tracking_uri()}: run dvc repro first")
    runs = filter_params(runs, _parse_where(where))
    if runs.empty:
        raise AevaeError(f"no model run has {' and '.join(where)}: check the values with aevae compare")
    return runs


@click.command()
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="Also write the table to this CSV file.")
@click.option("--by-seed", is_flag=True,
              help="Group trainings that differ only in train.seed: mean and sd across seeds, next to the "
                   "mean half-width of each run's 95% interval over test images.")
@param_filter
@experiment_option
def compare(csv_path: str | None, by_seed: bool, where: tuple[str, ...], experiment: str) -> None:
    """Compare the model runs in the MLflow store: DVC experiment, key params and test metrics, one row
    per run (or, with --by-seed, one row per model and configuration)."""
    from aevae.compare.runs import run_table, seed_groups

    runs = _runs(experiment, where)
    table = seed_groups(runs) if by_seed else run_table(runs)
    _echo_table(table)
    if csv_path:
        table.to_csv(csv_path, index=False)
        click.echo(f"wrote {csv_path}", err=True)


@click.command("rate-distortion")
@click.option("--out", default="rate_distortion.png", show_default=True, type=click.Path(dir_okay=False),
              help="The plot; the table goes beside it with the suffix .csv.")
@param_filter
@experiment_option
def rate_distortion(out: str, where: tuple[str, ...], experiment: str) -> None:
    """Plot the distortion (test PSNR and per-pixel MSE) against the rate (test KL, nats per image) of every
    model with an ELBO at each of its settings in separate experiments (a VAE at several beta, say), mean
    and sd over training seeds, with the models without a rate as reference lines. (One study's own models
    are in its report.)"""
    import pandas as pd

    from aevae.compare.rate_distortion import rate_distortion as trade_off
    from aevae.report.rate_distortion import plot_rate_distortion, rate_steps

    points, refs = trade_off(_runs(experiment, where))
    path = Path(out)
    plot_rate_distortion(points, refs, path)
    table = pd.concat([points.rename(columns={"label": "model"}), refs.rename(columns={"label": "model"})],
                      ignore_index=True)
    table.to_csv(path.with_suffix(".csv"), index=False)
    _echo_table(table)
    for line in rate_steps(points):
        click.echo(line)
    click.echo(f"wrote {path} and {path.with_suffix('.csv')}", err=True)
