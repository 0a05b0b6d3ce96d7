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
        raise AevaeError(f"MLflow store {uri} is not usable: {err}".replace("\n", " ")) from None
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
    client = mlflow.MlflowClient()
    parent = _find_or_create_parent(mlflow, pipeline)
    client.update_run(parent, status="RUNNING")
    try:
        yield parent
    except KeyboardInterrupt:
        client.set_terminated(parent, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    client.set_terminated(parent, status="FINISHED")


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
    present) GPU use into it every 10 s."""
    with start_run(name, params, tags, run_id=run_id, parent_id=parent_id, system_metrics=system_metrics) as run:
        write_run_file(run_file, run)
        yield run.info.run_id


def log_epoch(row: dict[str, float]) -> None:
    """One epoch's history row as metrics of the active run, at step = epoch."""
    import mlflow

    mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_images(images: dict[str, Image.Image], step: int) -> None:
    """Figures of the training as it goes, each under its key with its epoch, for MLflow's image view."""
    import mlflow

    for key, image in images.items():
        mlflow.log_image(image, key=key, step=step)


def log_trained_model(out: ModelDir, best_val: float, model: Model) -> None:
    """The best checkpoint, its history, and the model as an MLflow model (`runs:/<run id>/model`).

    The MLflow model is `Reconstructor(model)` exported with torch.export (MLflow's safe "pt2" format: no
    pickle), with a tensor signature (N, 3, H, W) float32 in [0, 1] -> the same shape, and the model's
    kind and config as metadata, from which `load_logged_model` rebuilds the aevae model itself."""
    from importlib.metadata import version

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from aevae.models import Reconstructor

    mlflow.log_metric("best_val_loss", best_val)
    mlflow.log_artifact(str(out.best), artifact_path="checkpoints")
    mlflow.log_artifact(str(out.history))
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
        raise AevaeError(f"cannot load MLflow model {uri} from {tracking_uri()}: {err}".replace("\n", " ")) from None
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
        where = "trained here" if links[model.name] == here else f"restored from DVC's cache, trained in `{links[model.name]}`"
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
        raise AevaeError(f"cannot read MLflow store {uri}: {err}".replace("\n", " ")) from None
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
        raise AevaeError(f"cannot read MLflow store {tracking_uri()}: {err}".replace("\n", " ")) from None
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
