"""What every command-line entry point shares: logging, and user errors as one line, not a traceback."""

from __future__ import annotations

import logging
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
    try:
        with logging_redirect_tqdm():
            command.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except AevaeError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted: outputs written so far are kept.", err=True)
        sys.exit(130)
