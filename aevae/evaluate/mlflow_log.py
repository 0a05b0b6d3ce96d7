"""Evaluation's results in MLflow: each training run gets its test scores, and the pipeline's parent run
the study's (means over seeds) with a link to every training and the runs table's view."""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd

from aevae.config.schema import Params
from aevae.files.model_dir import ModelDir
from aevae.models.registry import model_class
from aevae.results.metrics_dir import MetricsDir
from aevae.results.names import HEADLINE, STUDY_PARAMS
from aevae.tracking.provenance import Pipeline
from aevae.tracking.runs import pipeline_stage, resume_run
from aevae.tracking.view import set_runs_view


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)


def training_scores(row: pd.Series) -> dict[str, float]:
    """One training's test scores as its run logs them: test_<metric> with _ci_low/_ci_high, and its ELBO."""
    scores = {}
    for name, value in row.items():
        if name in ("model", "seed") or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        scores[f"test_{name}"] = float(value)
    return scores


def log_test_results(params: Params, trainings: list[ModelDir], metrics: MetricsDir,
                     tables: tuple[pd.DataFrame, pd.DataFrame], tags: dict[str, str], data_sha256: str) -> None:
    """Test scores into each training's run (params and test scores side by side), and each model's
    study-level ones (means over seeds) as `<model>_test_<metric>` into the pipeline's parent run, with a
    link to every training run: one row per experiment in the UI's runs table. A training restored from
    DVC's cache was logged under another parent; the link says which. With tracking.register_models, each
    trained model also becomes a new version of `aevae-<model>` in the model registry. `tags` (the weights
    behind LPIPS and FID/KID, or why there are none) go on every run."""
    per_seed, summary = tables
    links = _log_trainings(params, trainings, metrics, per_seed, tags)
    headline = _headline(params, per_seed, summary)
    _log_parent(params, Pipeline.of(params.flat(), data_sha256), headline, tags, links)


def _log_trainings(params: Params, trainings: list[ModelDir], metrics: MetricsDir, per_seed: pd.DataFrame,
                   tags: dict[str, str]) -> dict[ModelDir, tuple[str, str]]:
    """Each training run's test scores and the evaluation files; its run id and the pipeline it ran in."""
    import mlflow

    links = {}
    for training in trainings:
        row = per_seed[(per_seed["model"] == training.config) & (per_seed["seed"] == training.seed)].iloc[0]
        with resume_run(training.run_file) as run:
            mlflow.log_metrics(training_scores(row))
            mlflow.set_tags(tags)
            for path in (metrics.eval_json, metrics.per_image, metrics.per_seed, metrics.summary):
                mlflow.log_artifact(str(path), artifact_path="eval")
            links[training] = (run.info.run_id, run.data.tags.get("pipeline", "?"))
        if params.tracking.register_models:
            mlflow.register_model(f"runs:/{run.info.run_id}/model", f"aevae-{training.config}")
    return links


def _headline(params: Params, per_seed: pd.DataFrame, summary: pd.DataFrame) -> dict[str, float]:
    """Each configuration's study-level scores (means over seeds), and its negative ELBO where it has one."""
    headline = {}
    for config in params.models:
        rows = summary[summary["model"] == config].set_index("metric")["mean"]
        headline.update({f"{config}_test_{m}": rows[m] for m in HEADLINE if m in rows and not math.isnan(rows[m])})
        seeds, neg_elbo = per_seed[per_seed["model"] == config], model_class(config, params).neg_elbo_term
        if neg_elbo and neg_elbo in seeds and seeds[neg_elbo].notna().all():
            headline[f"{config}_test_{neg_elbo}"] = seeds[neg_elbo].mean()
    return headline


def _log_parent(params: Params, pipeline: Pipeline, headline: dict[str, float], tags: dict[str, str],
                links: dict[ModelDir, tuple[str, str]]) -> None:
    import mlflow

    with pipeline_stage(pipeline) as parent:
        client = mlflow.MlflowClient()
        client.log_batch(parent, metrics=[_metric(k, v) for k, v in headline.items()])
        for key, value in tags.items():
            client.set_tag(parent, key, value)
        for training, (run_id, trained_in) in links.items():
            client.set_tag(parent, f"{training.config}_seed{training.seed}_run_id", run_id)
            client.set_tag(parent, f"{training.config}_seed{training.seed}_trained_in", trained_in)
        run = client.get_run(parent)
        client.set_tag(parent, "mlflow.note.content", _parent_note(links, run))
        study_params = [*STUDY_PARAMS, *(key for key in params.flat() if key.startswith("models.")
                                         and not key.endswith(".kind"))]
        set_runs_view(run.info.experiment_id, list(headline), study_params)


def _parent_note(links: dict[ModelDir, tuple[str, str]], parent: Any) -> str:
    """The parent run's description in the UI: where each training's run is, with a link."""
    experiment, here = parent.info.experiment_id, parent.data.tags.get("pipeline")
    lines = ["Training runs of the models this pipeline evaluated:", ""]
    for training, (run_id, trained_in) in links.items():
        where = "trained here" if trained_in == here else f"restored from DVC's cache, trained in `{trained_in}`"
        lines.append(f"- **{training.config}**, seed {training.seed}: "
                     f"[{run_id[:8]}](#/experiments/{experiment}/runs/{run_id}) ({where})")
    return "\n".join(lines)
