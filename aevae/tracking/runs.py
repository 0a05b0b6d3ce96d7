"""Where MLflow runs are made: one parent run per pipeline execution, a run per training and the report's
run nested under it, each with a status that is never left RUNNING."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aevae import AevaeError
from aevae.files.atomic import write_text
from aevae.tracking.outbox import Outbox, deliver_pending, end_run
from aevae.tracking.provenance import Pipeline
from aevae.tracking.store import EXPERIMENT, fail_fast, open_store, store_lock, tracking_uri

log = logging.getLogger(__name__)

ROLE = "aevae_role"  # tag: "pipeline" on the parent run of one pipeline execution, "stage" on its children,
# "tuning" on a tuning stage's run (under the pipeline's), whose trials' training runs are nested under it
TRIAL = "aevae_trial"  # tag: the trial's number on a tuning trial's training run (not one of the study's)


@contextmanager
def status_on_exit(end: Callable[[str], None]) -> Iterator[None]:
    """Calls `end` with the run's status when the block ends: FINISHED, KILLED on Ctrl-C/SIGTERM, FAILED on
    any other error (which goes on up)."""
    try:
        yield
    except KeyboardInterrupt:
        end("KILLED")
        raise
    except BaseException:
        end("FAILED")
        raise
    end("FINISHED")


def _find_or_create_parent(mlflow: Any, pipeline: Pipeline) -> str:
    """The parent run of this pipeline execution: created by its first stage that logs, with every param
    (the UI's compare view then shows what differs between experiments), found by the stages after it."""
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    with store_lock(tracking_uri()):  # two queue workers never share a pipeline, but be exact anyway
        found = client.search_runs([experiment_id], max_results=1, filter_string=(
            f"tags.pipeline = '{pipeline.tags['pipeline']}' and tags.{ROLE} = 'pipeline'"))
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=pipeline.name, tags={**pipeline.tags, ROLE: "pipeline"})
    items = [Param(key, str(value)) for key, value in sorted(pipeline.params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[start: start + 100])
    return run.info.run_id


@contextmanager
def pipeline_stage(pipeline: Pipeline) -> Iterator[str]:
    """The parent run's id while one stage of the pipeline runs: RUNNING meanwhile, then FINISHED, or
    FAILED/KILLED when the stage fails, so its status is the pipeline's as far as it has got."""
    mlflow = open_store()
    delivered, waiting = deliver_pending()  # what earlier stages could not send, oldest first
    if delivered or waiting:
        log.info("MLflow: %d run(s) with undelivered items sent, %d still waiting", delivered, waiting)
    parent = _find_or_create_parent(mlflow, pipeline)
    mlflow.MlflowClient().update_run(parent, status="RUNNING")

    def end(status: str) -> None:  # not worth an outbox of its own: the next stage sets it again
        try:
            with fail_fast():
                mlflow.MlflowClient().set_terminated(parent, status=status)
        except Exception as err:
            log.warning("MLflow: parent run %s not marked %s (%s)", parent, status, str(err).splitlines()[0])

    with status_on_exit(end):
        yield parent


@contextmanager
def start_run(name: str, params: dict[str, Any], tags: dict[str, str], parent_id: str | None = None) -> Iterator[Any]:
    """A new MLflow run named `name`, nested under `parent_id`, with `params` logged."""
    mlflow = open_store()
    run = mlflow.start_run(run_name=name, tags={**tags, ROLE: "stage"} if parent_id else tags,
                           parent_run_id=parent_id)
    with status_on_exit(lambda status: mlflow.end_run(status=status)):
        mlflow.log_params(params)
        yield run


@contextmanager
def training_run(name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None, run_file: Path,
                 parent_id: str, system_metrics: bool) -> Iterator[str]:
    """The run a training logs into (a new one under the pipeline's parent run, or `run_id` when
    resuming); its id goes to `run_file`. With `system_metrics`, MLflow samples CPU, memory and (when
    present) GPU use into it every 10 s.

    Starting needs the store (an unreachable server is an error before any training); after that the
    store may go away: what cannot be logged waits in the run's outbox, and the run's end is one more
    item there, so the run reads FINISHED only once everything before it has arrived."""
    mlflow = open_store()
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    else:
        run = mlflow.start_run(run_name=name, tags={**tags, ROLE: "stage"}, parent_run_id=parent_id,
                               log_system_metrics=system_metrics)
        mlflow.log_params(params)
    write_run_file(run_file, run)
    outbox = Outbox(run.info.run_id)
    with status_on_exit(lambda status: end_run(outbox, status)):
        yield run.info.run_id


@contextmanager
def resume_run(run_file: Path) -> Iterator[Any]:
    """Reopen the run whose id training wrote to `run_file`, so later stages log into it."""
    try:
        info = json.loads(Path(run_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AevaeError(f"{run_file} not found: run the training stages first (dvc repro)") from None
    mlflow = open_store()
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


def log_files_run(name: str, files: list[Path], pipeline: Pipeline, artifact_path: str) -> None:
    """A run `name` under the pipeline's parent run, holding `files` (the report's run)."""
    import mlflow

    with pipeline_stage(pipeline) as parent, start_run(name, {}, pipeline.tags, parent_id=parent):
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def write_run_file(path: Path, run: Any) -> None:
    info = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": tracking_uri()}
    write_text(path, json.dumps(info, indent=2) + "\n")

