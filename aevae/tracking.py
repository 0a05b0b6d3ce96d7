"""MLflow: where runs go, and what each run records. mlflow is imported only when a run starts."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aevae import AevaeError, __version__
from aevae.files import MetricsDir, ModelDir, write_text

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

EXPERIMENT = "aevae"


def project_root() -> Path:
    """The repository the user started from, also inside `dvc exp run --temp` and queue workers."""
    # DVC points DVC_ROOT at the parent repo even when the stage runs in a temporary copy of it.
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else a sqlite store at the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts next to a sqlite store (MLflow's default would be relative to the working directory)."""
    if not uri.startswith("sqlite:///"):
        return None  # a tracking server decides where its artifacts go
    db = Path(unquote(uri.removeprefix("sqlite:///")))  # "sqlite:////abs.db" leaves "/abs.db"
    return (db.parent.resolve() / "mlartifacts").as_uri()


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def pipeline_id(params: dict[str, Any]) -> str:
    """What groups the runs of one pipeline execution: the DVC experiment, else commit + params."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{git_commit()[:8]}-{digest}"


def run_tags(data_sha256: str, params: dict[str, Any]) -> dict[str, str]:
    """Tags of every run: provenance (commit, data, versions) and the DVC experiment it belongs to."""
    import torch

    tags = {
        "git_commit": git_commit(),
        "data_sha256": data_sha256,
        "pipeline": pipeline_id(params),
        "aevae_version": __version__,
        "torch_version": torch.__version__,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def _store_lock(uri: str):
    """A lock beside a sqlite store. MLflow migrates a new store's schema on first use, and two
    processes doing that at once (parallel queue workers) corrupt it (measured: 6 of 6 failed)."""
    from filelock import FileLock

    if not uri.startswith("sqlite:///"):
        return nullcontext()
    db = Path(unquote(uri.removeprefix("sqlite:///")))
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=600)


def _mlflow():
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            if mlflow.get_experiment_by_name(EXPERIMENT) is None:  # also creates the schema of a new store
                mlflow.create_experiment(EXPERIMENT, artifact_location=_artifact_location(uri))
    except mlflow.exceptions.MlflowException as err:
        raise AevaeError(f"MLflow store {uri} is not usable: {err}".replace("\n", " ")) from None
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


@contextmanager
def start_run(name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None) -> Iterator[Any]:
    """A new MLflow run named `name` (or the run `run_id`, continued); ended KILLED on Ctrl-C/SIGTERM and
    FAILED on any other error, so no run is left RUNNING."""
    mlflow = _mlflow()
    run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=name, tags=tags)
    try:
        if not run_id:
            mlflow.log_params(params)
        yield run
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run()


@contextmanager
def training_run(name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None,
                 run_file: Path) -> Iterator[str]:
    """The run a training logs into (a new one, or `run_id` when resuming); its id goes to `run_file`."""
    with start_run(name, params, tags, run_id=run_id) as run:
        write_run_file(run_file, run)
        yield run.info.run_id


def log_epoch(row: dict[str, float]) -> None:
    """One epoch's history row as metrics of the active run, at step = epoch."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_trained_model(out: ModelDir, best_val: float) -> None:
    import mlflow

    mlflow.log_metric("best_val_loss", best_val)
    mlflow.log_artifact(str(out.best), artifact_path="checkpoints")
    mlflow.log_artifact(str(out.history))


@contextmanager
def resume_run(run_file: Path) -> Iterator[Any]:
    """Reopen the run whose id training wrote to `run_file`, so later stages log into it."""
    try:
        info = json.loads(Path(run_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AevaeError(f"{run_file} not found: run the training stages first (dvc repro)") from None
    mlflow = _mlflow()
    try:
        trained = mlflow.MlflowClient().get_run(info["run_id"]).info
    except mlflow.exceptions.MlflowException:
        raise AevaeError(
            f"MLflow run {info['run_id']} from {run_file} is not in the store {tracking_uri()}: "
            "was MLFLOW_TRACKING_URI changed since training? Re-train with dvc repro --force"
        ) from None
    try:
        yield mlflow.start_run(run_id=trained.run_id)
    finally:
        mlflow.end_run()
        # Adding results later must not change the training's status or duration (ending a resumed run
        # would stamp it FINISHED, or FAILED if evaluation failed, and stretch its duration to now).
        mlflow.MlflowClient().set_terminated(trained.run_id, status=trained.status, end_time=trained.end_time)


def write_run_file(path: Path, run: Any) -> None:
    info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri()}
    write_text(path, json.dumps(info, indent=2) + "\n")


def run_id_of(model: ModelDir) -> str:
    return json.loads(model.run_file.read_text(encoding="utf-8"))["run_id"]


def log_test_results(models: list[ModelDir], metrics: MetricsDir, summary: "pd.DataFrame",
                     elbo: dict[str, dict[str, float]], tags: dict[str, str]) -> None:
    """Test metrics, with their per-image 95% intervals, into each model's training run, so that MLflow
    shows params and test scores side by side."""
    import mlflow

    for model in models:
        scores = {}
        for r in summary[summary["model"] == model.name].itertuples():
            if not math.isnan(r.mean):
                scores.update({f"test_{r.metric}": r.mean, f"test_{r.metric}_ci_low": r.ci_low,
                               f"test_{r.metric}_ci_high": r.ci_high})
        scores.update({f"test_{name}": value for name, value in elbo.get(model.name, {}).items()})
        with resume_run(model.run_file):
            mlflow.log_metrics(scores)
            mlflow.set_tags(tags)
            for path in (metrics.eval_json, metrics.per_image, metrics.summary):
                mlflow.log_artifact(str(path), artifact_path="eval")


def log_report(files: list[Path], models: list[ModelDir], data_sha256: str, params: dict[str, Any]) -> None:
    """A `report` run holding every report file, tagged with the model runs it summarises."""
    tags = run_tags(data_sha256, params)
    tags.update({f"{model.name}_run_id": run_id_of(model) for model in models})
    with start_run("report", {}, tags):
        import mlflow

        for path in files:
            mlflow.log_artifact(str(path), artifact_path="report")


def model_runs(experiment: str = EXPERIMENT) -> "pd.DataFrame":
    """One row per model training run, oldest first: ids, model (kind) and label, its DVC experiment,
    status, every param it logged (`params.<params.yaml key>`) and every metric (`metrics.<name>`, the
    test_* ones from evaluation)."""
    import mlflow
    import pandas as pd

    from aevae.models import MODEL_KINDS

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(unquote(uri.removeprefix("sqlite:///"))).exists():
        return pd.DataFrame()  # reading must not create a store (MLflow would, with its schema)
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(experiment) is None:
            return pd.DataFrame()
        runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"])
    except mlflow.exceptions.MlflowException as err:
        raise AevaeError(f"cannot read MLflow store {uri}: {err}".replace("\n", " ")) from None
    if runs.empty:
        return pd.DataFrame()
    runs = runs[runs["tags.mlflow.runName"].isin(MODEL_KINDS)].reset_index(drop=True)
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "model": runs["tags.mlflow.runName"],
        "label": runs.get("tags.model_label", runs["tags.mlflow.runName"]),
        "pipeline": runs.get("tags.pipeline"),
        "status": runs["status"],
        "started": runs["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
    })
    return pd.concat([table, runs.filter(regex=r"^(params|metrics)\.")], axis=1)
