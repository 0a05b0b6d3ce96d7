"""The MLflow store: where it is, opening it safely, and what its failures mean to a user."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aevae import AevaeError
from aevae.files.project import project_root

EXPERIMENT = "aevae"
# MLflow's experiment kind: a classic model-training experiment opens on its runs table (the default
# inferred for a new experiment is the GenAI overview of traces, empty here).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a sqlite store at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite store URI ("sqlite:////abs.db" -> /abs.db), None for a server."""
    return Path(unquote(uri.removeprefix("sqlite:///"))) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Artifacts next to a sqlite store (MLflow's default would be relative to the working directory)."""
    db = sqlite_file(uri)
    return None if db is None else (db.parent.resolve() / "mlartifacts").as_uri()


def store_lock(uri: str):
    """A lock beside a sqlite store. MLflow migrates a new store's schema on first use, and two
    processes doing that at once (parallel queue workers) corrupt it (seen every time it was tried)."""
    from filelock import FileLock

    db = sqlite_file(uri)
    if db is None:
        return nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=600)


def store_error(err: Exception, what: str) -> AevaeError:
    """One line for an MLflow failure: `what` failed, and why; for a server that refuses the login or the
    permission, what to set instead of MLflow's HTTP status."""
    uri, user = tracking_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME")
    code = getattr(err, "error_code", "")
    if code == "UNAUTHENTICATED" and not user:
        return AevaeError(f"MLflow at {uri} asks for a login: set MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD to your account there (docs/team.md)")
    if code == "UNAUTHENTICATED":
        return AevaeError(f"MLflow at {uri} refused the login of '{user}' (wrong password or no such user): check "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (docs/team.md)")
    if code == "PERMISSION_DENIED":
        return AevaeError(f"MLflow at {uri} does not let '{user}' {what}: ask its admin for EDIT permission on "
                          f"experiment '{EXPERIMENT}' (docs/team.md)")
    down = _unreachable(str(err))
    if down:
        return AevaeError(f"cannot {what}: MLflow at {uri} does not answer ({down}); start the server, or point "
                          "MLFLOW_TRACKING_URI at one that runs (unset, the store is mlflow.db at the repository root)")
    return AevaeError(f"cannot {what} ({uri}): {err}".replace("\n", " "))


def _unreachable(message: str) -> str | None:
    """Why a server could not be reached, in words, from the error MLflow's HTTP client raised; None when it
    answered (with an error of its own)."""
    for needle, words in (("Connection refused", "connection refused"), ("timed out", "no answer in time"),
                          ("Name or service not known", "unknown host"), ("Max retries exceeded", "unreachable")):
        if needle in message:
            return words
    return None


def open_store() -> Any:
    """mlflow, pointed at the store and the experiment (created, with its UI kind, on first use)."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        # A few tries, not MLflow's minutes of them: a server that is down is an error before any training.
        with store_lock(uri), fail_fast(retries=2):
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)  # also creates the schema of a new store
            if experiment is None:
                mlflow.create_experiment(EXPERIMENT, artifact_location=artifact_location(uri),
                                         tags=dict([EXPERIMENT_KIND]))
            elif experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # a store an older aevae made
                mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException as err:
        raise store_error(err, "log to the MLflow store") from None
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def existing_experiment_id(experiment: str = EXPERIMENT) -> str | None:
    """The experiment's id in the store, or None; reading never creates a store (MLflow would, with its
    schema, in whatever folder the user stands in)."""
    import mlflow

    uri = tracking_uri()
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        return None
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
    except mlflow.exceptions.MlflowException as err:
        raise store_error(err, "read the MLflow store") from None
    return found.experiment_id if found else None


@contextmanager
def fail_fast(retries: int = 0) -> Iterator[None]:
    """One try (or 1 + `retries`, 2 s then 4 s apart), 10 s each at most: MLflow's client retries a dead
    server for minutes (4 at its defaults: an outage stalled training for longer than it lasted), and a
    training must not wait on it."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
