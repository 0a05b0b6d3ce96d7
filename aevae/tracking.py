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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from aevae import AevaeError, __version__
from aevae.files import MetricsDir, ModelDir, write_text

if TYPE_CHECKING:
    import pandas as pd
    from PIL import Image

    from aevae.models import Model

log = logging.getLogger(__name__)

EXPERIMENT = "aevae"
# MLflow's experiment kind: a classic model-training experiment opens on its runs table (the default
# inferred for a new experiment is the GenAI overview of traces, empty here).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
ROLE = "aevae_role"  # tag: "pipeline" on the parent run of one pipeline execution, "stage" on its children
HEADLINE = ("psnr", "ssim", "lpips", "neg_elbo_nats")  # the test metrics a parent run shows per model
SWEPT_PARAMS = ("lr", "epochs", "batch_size", "vae.beta", "vae.latent_dim", "train.seed", "train.precision")
VIEW = "aevae"  # the runs table's shared view: one row per experiment, its params and every model's test scores


def runs_view() -> dict[str, Any]:
    """MLflow UI state of the shared view VIEW (an experiment tag the UI reads for ?viewStateShareKey=):
    the parent runs' columns, newest first."""
    from aevae.models import MODEL_KINDS

    metrics = [f"metrics.`{kind}_test_{m}`" for kind in MODEL_KINDS for m in HEADLINE
               if m != "neg_elbo_nats" or kind == "vae"]
    return {"selectedColumns": metrics + [f"params.`{p}`" for p in SWEPT_PARAMS],
            "orderByKey": "attributes.start_time", "orderByAsc": False}


def ui_address(base: str, experiment_id: str) -> str:
    """Where the runs table opens with that view (the UI's default mode is GenAI's trace overview)."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW}&workflowType=machine_learning"


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


@dataclass(frozen=True)
class Pipeline:
    """One pipeline execution as its stages log it: every param (flat) and the tags of every run."""

    params: dict[str, Any]
    tags: dict[str, str]

    @classmethod
    def of(cls, params: dict[str, Any], data_sha256: str) -> Pipeline:
        return cls(params, run_tags(data_sha256, params))


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


def store_error(err: Exception, what: str) -> AevaeError:
    """One line for an MLflow failure: `what` failed, and why; for a server that refuses the login or the
    permission, what to set instead of MLflow's HTTP status."""
    uri, user = tracking_uri(), os.environ.get("MLFLOW_TRACKING_USERNAME")
    code = getattr(err, "error_code", "")
    if code == "UNAUTHENTICATED" and not user:
        return AevaeError(f"MLflow at {uri} asks for a login: set MLFLOW_TRACKING_USERNAME and "
                          "MLFLOW_TRACKING_PASSWORD to your account there (README: Team setup)")
    if code == "UNAUTHENTICATED":
        return AevaeError(f"MLflow at {uri} refused the login of '{user}' (wrong password or no such user): check "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if code == "PERMISSION_DENIED":
        return AevaeError(f"MLflow at {uri} does not let '{user}' {what}: ask its admin for EDIT permission on "
                          f"experiment '{EXPERIMENT}' (README: Team setup)")
    return AevaeError(f"cannot {what} ({uri}): {err}".replace("\n", " "))


def _mlflow():
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            experiment = mlflow.get_experiment_by_name(EXPERIMENT)  # also creates the schema of a new store
            tags = dict([EXPERIMENT_KIND, (f"mlflow.sharedViewState.{VIEW}", json.dumps(runs_view()))])
            if experiment is None:
                mlflow.create_experiment(EXPERIMENT, artifact_location=_artifact_location(uri), tags=tags)
            else:  # a store an older aevae created
                for key, value in tags.items():
                    if experiment.tags.get(key) != value:
                        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
    except mlflow.exceptions.MlflowException as err:
        raise store_error(err, "log to the MLflow store") from None
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def pipeline_name(pipeline: str) -> str:
    """The parent run's name: the DVC experiment's, or `repro-<commit>-<params>` for a workspace repro."""
    return os.environ.get("DVC_EXP_NAME") or f"repro-{pipeline}"


def _find_or_create_parent(mlflow: Any, pipeline: Pipeline) -> str:
    """The parent run of this pipeline execution: created by its first stage that logs, with every param
    (the UI's compare view then shows what differs between experiments), found by the stages after it."""
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    with _store_lock(tracking_uri()):  # two queue workers never share a pipeline, but be exact anyway
        found = client.search_runs([experiment_id], max_results=1, filter_string=(
            f"tags.pipeline = '{pipeline.tags['pipeline']}' and tags.{ROLE} = 'pipeline'"))
        if found:
            return found[0].info.run_id
        run = client.create_run(experiment_id, run_name=pipeline_name(pipeline.tags["pipeline"]),
                                tags={**pipeline.tags, ROLE: "pipeline"})
    from mlflow.entities import Param

    items = [Param(key, str(value)) for key, value in sorted(pipeline.params.items())]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[start: start + 100])
    return run.info.run_id


@contextmanager
def pipeline_stage(pipeline: Pipeline) -> Iterator[str]:
    """The parent run's id while one stage of the pipeline runs: RUNNING meanwhile, then FINISHED, or
    FAILED/KILLED when the stage fails, so its status is the pipeline's as far as it has got."""
    mlflow = _mlflow()
    delivered, waiting = deliver_pending()  # what earlier stages could not send, oldest first
    if delivered or waiting:
        log.info("MLflow: %d run(s) with undelivered items sent, %d still waiting", delivered, waiting)
    client = mlflow.MlflowClient()
    parent = _find_or_create_parent(mlflow, pipeline)
    client.update_run(parent, status="RUNNING")
    try:
        yield parent
    except KeyboardInterrupt:
        _set_parent_status(parent, "KILLED")
        raise
    except BaseException:
        _set_parent_status(parent, "FAILED")
        raise
    _set_parent_status(parent, "FINISHED")


def _set_parent_status(parent: str, status: str) -> None:
    """The parent's status after a stage, with the run's own items delivered; the parent's status is
    not worth an Outbox of its own: the next stage sets it again."""
    import mlflow

    try:
        with _fail_fast():
            mlflow.MlflowClient().set_terminated(parent, status=status)
    except Exception as err:
        log.warning("MLflow: parent run %s not marked %s (%s)", parent, status, str(err).splitlines()[0])


@contextmanager
def start_run(name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None = None,
              parent_id: str | None = None, system_metrics: bool = False) -> Iterator[Any]:
    """A new MLflow run named `name` (or the run `run_id`, continued), nested under `parent_id`; ended
    KILLED on Ctrl-C/SIGTERM and FAILED on any other error, so no run is left RUNNING."""
    mlflow = _mlflow()
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    else:
        run = mlflow.start_run(run_name=name, tags={**tags, ROLE: "stage"} if parent_id else tags,
                               parent_run_id=parent_id, log_system_metrics=system_metrics)
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
def training_run(name: str, params: dict[str, Any], tags: dict[str, str], run_id: str | None, run_file: Path,
                 parent_id: str, system_metrics: bool) -> Iterator[str]:
    """The run a training logs into (a new one under the pipeline's parent run, or `run_id` when
    resuming); its id goes to `run_file`. With `system_metrics`, MLflow samples CPU, memory and (when
    present) GPU use into it every 10 s.

    Starting needs the store (an unreachable server is an error before any training); after that the
    store may go away: what cannot be logged waits in the run's Outbox, and the run's end is one more
    item there, so the run reads FINISHED only once everything before it has arrived."""
    mlflow = _mlflow()
    if run_id:
        run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    else:
        run = mlflow.start_run(run_name=name, tags={**tags, ROLE: "stage"}, parent_run_id=parent_id,
                               log_system_metrics=system_metrics)
        mlflow.log_params(params)
    write_run_file(run_file, run)
    outbox = Outbox(run.info.run_id)
    try:
        yield run.info.run_id
    except KeyboardInterrupt:
        _end_training_run(outbox, "KILLED")
        raise
    except BaseException:
        _end_training_run(outbox, "FAILED")
        raise
    _end_training_run(outbox, "FINISHED")


def _end_training_run(outbox: Outbox, status: str) -> None:
    """The run's end, as the last item of its Outbox; then the fluent run (and its system metrics
    sampler) is closed, which sets the same status again, or fails harmlessly while the store is away."""
    import mlflow

    outbox.put({"kind": "end", "status": status, "end_time": _now_ms()})
    delivered = outbox.deliver()
    try:
        with _fail_fast():
            mlflow.end_run(status=status)
    except Exception as err:
        log.debug("end_run: %s", err)
    if not delivered:
        log.warning("MLflow at %s is unreachable: %d item(s) of run %s (the last: its %s status) wait in %s; "
                    "the next aevae stage sends them, or `aevae sync` once the server is back",
                    tracking_uri(), len(outbox.items()), outbox.run_id, status, outbox.path)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


# ---------------------------------------------------------------- outages of a tracking server

FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def _fail_fast() -> Iterator[None]:
    """One try, 10 s at most: MLflow's client retries a dead server for minutes (a 30 s outage stalled
    training for 70 s), and a training must not wait on it."""
    saved = {key: os.environ.get(key) for key in FAIL_FAST}
    os.environ.update(FAIL_FAST)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pending_dir() -> Path:
    """Where undelivered items wait: inside the repository the user started from (a queued experiment's
    temporary copy is deleted when it ends), in DVC's git-ignored tmp folder."""
    return project_root() / ".dvc" / "tmp" / "mlflow-pending"


class Outbox:
    """What a run could not log yet, in order: one JSON line per item (an epoch's metrics, a file, the
    model, the run's end) in pending_dir()/<run id>.jsonl; files are copied beside it. `deliver` sends
    the items oldest first and keeps whatever the store did not take, so every epoch arrives, in order,
    once; a request that failed after the server stored it (a timeout at the wrong moment) would be sent
    again, which for metrics adds a duplicate point at the same step."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.path = pending_dir() / f"{run_id}.jsonl"

    def items(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def put(self, item: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(item) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def keep_file(self, path: Path) -> str:
        """A copy of `path` that outlives the stage's folder, for a later delivery."""
        import shutil

        copy = self.path.parent / self.run_id / path.name  # the name the artifact keeps
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        return str(copy)

    def deliver(self) -> bool:
        """Send every item, oldest first; True when nothing is left. One sender at a time: another
        process delivering this run already is left to it."""
        from filelock import FileLock, Timeout

        if not self.path.exists():
            return True
        try:
            with FileLock(f"{self.path}.lock", timeout=0):
                return self._deliver_all()
        except Timeout:
            return False

    def _deliver_all(self) -> bool:
        items = self.items()
        done = 0
        try:
            with _fail_fast():
                for item in items:
                    _deliver(self.run_id, item)
                    done += 1
        except Exception as err:  # any failure of the store: keep the rest, in order, for later
            log.debug("MLflow delivery for run %s stopped: %s", self.run_id, err)
        if done == len(items):
            self._clear()
            return True
        from aevae.files import write_text

        write_text(self.path, "".join(json.dumps(item) + "\n" for item in items[done:]))
        return False

    def _clear(self) -> None:
        import shutil

        shutil.rmtree(self.path.parent / self.run_id, ignore_errors=True)
        self.path.unlink(missing_ok=True)


def _deliver(run_id: str, item: dict[str, Any]) -> None:
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    if item["kind"] == "metrics":
        metrics = [Metric(k, v, item["timestamp"], item["step"]) for k, v in item["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif item["kind"] == "file":
        client.log_artifact(run_id, item["file"], artifact_path=item["artifact_path"])
    elif item["kind"] == "model":
        from aevae.models import load_model

        with mlflow.start_run(run_id=run_id):
            _log_model(load_model(Path(item["file"]))[0])
    elif item["kind"] == "end":
        client.set_terminated(run_id, status=item["status"], end_time=item["end_time"])


def deliver_pending() -> tuple[int, int]:
    """Send what earlier stages could not; (runs completed, runs still waiting)."""
    folder = pending_dir()
    waiting = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    if not waiting:
        return 0, 0
    _mlflow()
    left = sum(not Outbox(path.stem).deliver() for path in waiting)
    return len(waiting) - left, left


def log_epoch(row: dict[str, float]) -> None:
    """One epoch's history row as metrics of the active run, at step = epoch; through the run's Outbox,
    so that an unreachable store delays it instead of stopping the training."""
    import mlflow

    outbox = Outbox(mlflow.active_run().info.run_id)
    was_waiting = outbox.path.exists()
    outbox.put({"kind": "metrics", "step": int(row["epoch"]), "timestamp": _now_ms(),
                "metrics": {k: v for k, v in row.items() if k != "epoch"}})
    if outbox.deliver():
        if was_waiting:
            log.warning("MLflow at %s answers again: the epochs it missed were delivered", tracking_uri())
    elif not was_waiting:
        log.warning("MLflow at %s does not answer: training goes on, its metrics wait in %s and are sent, in "
                    "order, when it answers again", tracking_uri(), outbox.path)


def log_images(images: dict[str, Image.Image], step: int) -> None:
    """Figures of the training as it goes, each under its key with its epoch, for MLflow's image view.
    They illustrate the metrics and are not kept for later: during an outage they are skipped."""
    import mlflow

    try:
        with _fail_fast():
            for key, image in images.items():
                mlflow.log_image(image, key=key, step=step, synchronous=True)
    except Exception as err:  # the store is away: the metrics are what must arrive
        log.warning("images of epoch %d not logged to MLflow (%s)", step, str(err).splitlines()[0])


def log_trained_model(out: ModelDir, best_val: float, model: Model) -> None:
    """The best checkpoint, its history, and the model as an MLflow model (`runs:/<run id>/model`); what
    the store does not take now goes to the run's Outbox, before the run's end."""
    import mlflow

    outbox = Outbox(mlflow.active_run().info.run_id)
    outbox.put({"kind": "metrics", "step": 0, "timestamp": _now_ms(), "metrics": {"best_val_loss": best_val}})
    best = outbox.keep_file(out.best)
    outbox.put({"kind": "file", "file": best, "artifact_path": "checkpoints"})
    outbox.put({"kind": "file", "file": outbox.keep_file(out.history), "artifact_path": None})
    if outbox.deliver():
        try:
            with _fail_fast():
                _log_model(model)
            return
        except Exception as err:  # the store went away between the two
            log.debug("logging the model failed: %s", err)
        best = outbox.keep_file(out.best)  # delivering cleared the copy
    outbox.put({"kind": "model", "file": best})


def _log_model(model: Model) -> None:
    """The model as an MLflow model in the active run.

    It is `Reconstructor(model)` exported with torch.export (MLflow's safe "pt2" format: no pickle), with
    a tensor signature (N, 3, H, W) float32 in [0, 1] -> the same shape, and the model's kind and config
    as metadata, from which `load_logged_model` rebuilds the aevae model itself."""
    from importlib.metadata import version

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from aevae.models import Reconstructor

    size = model.config["image_size"]
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))])
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()  # batch > 1: a dynamic N
    mlflow.pytorch.log_model(
        Reconstructor(model).cpu(), name="model", signature=ModelSignature(inputs=spec, outputs=spec),
        input_example=example, serialization_format="pt2", pip_requirements=[f"torch=={version('torch')}"],
        metadata={"aevae_kind": model.kind, "aevae_config": model.config, "aevae_label": model.label})


def load_logged_model(uri: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, config, weights) of a model `log_trained_model` logged, from any MLflow model URI
    (`runs:/<run id>/model`, `models:/aevae-vae/1`, ...)."""
    import mlflow

    _mlflow()
    try:
        info = mlflow.models.get_model_info(uri)
        module = mlflow.pytorch.load_model(uri)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise store_error(err, f"load MLflow model {uri}") from None
    meta = info.metadata or {}
    if "aevae_kind" not in meta:
        raise AevaeError(f"{uri} is not an aevae model (no aevae_kind in its MLflow metadata)")
    weights = {key.removeprefix("model."): value for key, value in module.state_dict().items()}
    return meta["aevae_kind"], meta["aevae_config"], weights


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
                     elbo: dict[str, dict[str, float]], tags: dict[str, str], pipeline: Pipeline,
                     register: bool) -> None:
    """Test metrics, with their per-image 95% intervals, into each model's training run (params and test
    scores side by side), and the headline ones as `<model>_test_<metric>` into the pipeline's parent run,
    with a link to each model's training run: one row per experiment in the UI's runs table. A model
    restored from DVC's cache was trained under another parent; the link says which. With `register`,
    each model also becomes a new version of `aevae-<model>` in the model registry."""
    import mlflow

    headline, links = {}, {}
    for model in models:
        scores = {}
        for r in summary[summary["model"] == model.name].itertuples():
            if not math.isnan(r.mean):
                scores.update({f"test_{r.metric}": r.mean, f"test_{r.metric}_ci_low": r.ci_low,
                               f"test_{r.metric}_ci_high": r.ci_high})
        scores.update({f"test_{name}": value for name, value in elbo.get(model.name, {}).items()})
        headline.update({f"{model.name}_test_{m}": scores[f"test_{m}"] for m in HEADLINE if f"test_{m}" in scores})
        with resume_run(model.run_file) as run:
            mlflow.log_metrics(scores)
            mlflow.set_tags(tags)
            for path in (metrics.eval_json, metrics.per_image, metrics.summary):
                mlflow.log_artifact(str(path), artifact_path="eval")
            links[model.name] = run.data.tags.get("pipeline", "?")
        if register:
            mlflow.register_model(f"runs:/{run.info.run_id}/model", f"aevae-{model.name}")
    with pipeline_stage(pipeline) as parent:
        client = mlflow.MlflowClient()
        client.log_batch(parent, metrics=[_metric(k, v) for k, v in headline.items()])
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        for model in models:
            client.set_tag(parent, f"{model.name}_run_id", run_id_of(model))
            client.set_tag(parent, f"{model.name}_trained_in", links[model.name])
        client.set_tag(parent, "mlflow.note.content", _parent_note(models, links, client.get_run(parent)))


def _metric(key: str, value: float) -> Any:
    import time

    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _parent_note(models: list[ModelDir], links: dict[str, str], parent: Any) -> str:
    """The parent run's description in the UI: where each model's training run is, with a link."""
    experiment, here = parent.info.experiment_id, parent.data.tags.get("pipeline")
    lines = ["Training runs of the models this pipeline evaluated:", ""]
    for model in models:
        run_id = run_id_of(model)
        trained_in = links[model.name]
        where = "trained here" if trained_in == here else f"restored from DVC's cache, trained in `{trained_in}`"
        lines.append(f"- **{model.name}**: [{run_id[:8]}](#/experiments/{experiment}/runs/{run_id}) ({where})")
    return "\n".join(lines)


def log_report(files: list[Path], pipeline: Pipeline) -> None:
    """A `report` run under the pipeline's parent run, holding every report file."""
    with pipeline_stage(pipeline) as parent, start_run("report", {}, pipeline.tags, parent_id=parent):
        import mlflow

        for path in files:
            mlflow.log_artifact(str(path), artifact_path="report")


def existing_experiment_id(experiment: str = EXPERIMENT) -> str | None:
    """The experiment's id in the store, or None; reading never creates a store (MLflow would, with its
    schema, in whatever folder the user stands in)."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(unquote(uri.removeprefix("sqlite:///"))).exists():
        return None
    mlflow.set_tracking_uri(uri)
    try:
        found = mlflow.get_experiment_by_name(experiment)
    except mlflow.exceptions.MlflowException as err:
        raise store_error(err, "read the MLflow store") from None
    return found.experiment_id if found else None


def model_runs(experiment: str = EXPERIMENT) -> "pd.DataFrame":
    """One row per model training run, oldest first: ids, model (kind) and label, its DVC experiment,
    status, every param it logged (`params.<params.yaml key>`) and every metric (`metrics.<name>`, the
    test_* ones from evaluation)."""
    import mlflow
    import pandas as pd

    from aevae.models import MODEL_KINDS

    if existing_experiment_id(experiment) is None:
        return pd.DataFrame()
    try:
        runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"])
    except mlflow.exceptions.MlflowException as err:
        raise store_error(err, "read the MLflow store") from None
    if runs.empty:
        return pd.DataFrame()
    stage = runs.get("tags.aevae_role", pd.Series("stage", index=runs.index)) != "pipeline"
    runs = runs[runs["tags.mlflow.runName"].isin(MODEL_KINDS) & stage].reset_index(drop=True)
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "model": runs["tags.mlflow.runName"],
        "label": runs.get("tags.model_label", runs["tags.mlflow.runName"]),
        "pipeline": runs.get("tags.pipeline"),
        "status": runs["status"],
        "started": runs["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
    })
    return pd.concat([table, runs.filter(regex=r"^(params|metrics)\.")], axis=1)
