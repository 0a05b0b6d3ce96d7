"""`aevae ui` and `aevae sync`: the MLflow UI on this project's runs, and what an outage kept back."""

from __future__ import annotations

from pathlib import Path

import click

from aevae import AevaeError


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to serve on.")
@click.option("--port", default=5000, show_default=True, type=click.IntRange(1, 65535))
def ui(host: str, port: int) -> None:
    """Open the runs in MLflow's UI: start it on this project's store (mlflow.db here) and print the
    address of the runs table, one row per experiment with its params and every model's test scores.
    With MLFLOW_TRACKING_URI pointing at a server, only print that server's address."""
    import os
    import shutil
    import sys

    from aevae.tracking.store import EXPERIMENT, existing_experiment_id, tracking_uri
    from aevae.tracking.view import ui_address

    uri, experiment_id = tracking_uri(), existing_experiment_id()
    if experiment_id is None:
        raise AevaeError(f"no '{EXPERIMENT}' experiment in {uri}: run dvc repro first")
    if uri.startswith(("http://", "https://")):
        click.echo(ui_address(uri.rstrip("/"), experiment_id))
        return
    beside = Path(sys.executable).with_name("mlflow")  # the venv's, also when it is not activated
    mlflow = str(beside) if beside.exists() else shutil.which("mlflow")
    if mlflow is None:
        raise AevaeError("no mlflow command beside this Python or on PATH: pip install -e . in the project's venv")
    click.echo(f"aevae runs: {ui_address(f'http://{host}:{port}', experiment_id)}", err=True)
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)])


@click.command()
def sync() -> None:
    """Send to MLflow what trainings could not log while the tracking server was unreachable (kept in
    .dvc/tmp/mlflow-pending/ of this repository), oldest first; every aevae stage also does this first."""
    from aevae.tracking.outbox import deliver_pending, pending_dir
    from aevae.tracking.store import tracking_uri

    delivered, waiting = deliver_pending()
    if waiting:
        raise AevaeError(f"{tracking_uri()} does not answer: {waiting} run(s) still wait in {pending_dir()}; "
                         "run aevae sync again when it does")
    click.echo(f"{delivered} run(s) completed in {tracking_uri()}" if delivered else "nothing was waiting")

