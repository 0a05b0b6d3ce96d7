"""What every command-line entry point shares (the stage scripts in stages/ and the `aevae` command): the
common options, logging, and user errors as one line, not a traceback."""

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
# Paths have no defaults: dvc.yaml passes each stage its paths, so that they are written in one place.
data_option = click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
                           help="Output folder of the prepare stage.")
models_option = click.option("--models", "models_dir", required=True, type=click.Path(file_okay=False),
                             help="The trainings' folder: <models>/<configuration>/seed<seed>/.")


def run(command: click.Command) -> None:
    """Invoke a click command; AevaeError becomes `Error: ...` and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # SIGTERM (kill, a scheduler's timeout) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with logging_redirect_tqdm():
            command.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as err:  # click turns Ctrl-C into Abort
        # A training stopped on request says where it saved its state (aevae.train.stop.Stopped).
        said = str(err.__cause__ if isinstance(err, click.exceptions.Abort) else err)
        click.echo(f"Interrupted: {said}" if said else
                   "Interrupted: the last complete checkpoint and outputs are kept.", err=True)
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
