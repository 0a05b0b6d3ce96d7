"""What every command-line entry point shares: logging, and user errors as one line, not a traceback."""

from __future__ import annotations

import logging
import signal
import sys

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from aevae import AevaeError

params_option = click.option(
    "--params", "params_file", default="params.yaml", show_default=True,
    type=click.Path(dir_okay=False), help="Parameters file (see the comments in it).")


def run(command: click.Command) -> None:
    """Invoke a click command; AevaeError becomes `Error: ...` and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # SIGTERM (kill, a scheduler's timeout) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with logging_redirect_tqdm():
            command.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("Interrupted: the last complete checkpoint and outputs are kept.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except AevaeError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    except OSError as err:  # e.g. an output folder that cannot be created: no traceback for that either
        where = f" ({err.filename})" if err.filename else ""
        click.echo(f"Error: {err.strerror or err}{where}; check the path, free space and permissions", err=True)
        sys.exit(1)


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
