"""Every training run of every experiment in the MLflow store, as tables: what `aevae compare` prints,
one row per run or one per configuration with the spread over training seeds.

Each training run carries every param its training read and the test metrics evaluation logged into it,
so these see every experiment of every machine that logs there. (One study's own seeds are in its report;
these compare across experiments.)
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from aevae import AevaeError
from aevae.results.names import METRICS, SET_METRICS, STUDY_METRICS, TRAINING_PARAMS
from aevae.tracking.runs import TRIAL
from aevae.tracking.store import EXPERIMENT, existing_experiment_id, store_error

SEED = "params.train.seed"
# Params that say where or how fast a run went, not what it trained.
NOT_CONFIG = {"params.train.device", "params.train.threads"}


def model_runs(experiment: str = EXPERIMENT) -> pd.DataFrame:
    """One row per training run, oldest first: ids, model (configuration) and label, its DVC experiment,
    status, every param it logged (`params.<key>`) and every metric (`metrics.<name>`, the test_* ones
    from evaluation)."""
    import mlflow

    if existing_experiment_id(experiment) is None:
        return pd.DataFrame()
    try:
        runs = mlflow.search_runs(experiment_names=[experiment], order_by=["attributes.start_time ASC"])
    except mlflow.exceptions.MlflowException as err:
        raise store_error(err, "read the MLflow store") from None
    if runs.empty or "tags.model_config" not in runs:
        return pd.DataFrame()
    trials = runs.get(f"tags.{TRIAL}", pd.Series(None, index=runs.index, dtype=object)).notna()  # tuning's
    runs = runs[runs["tags.model_config"].notna() & ~trials].reset_index(drop=True)
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "model": runs["tags.model_config"],
        "label": runs.get("tags.model_label", runs["tags.model_config"]),
        "pipeline": runs.get("tags.pipeline"),
        "status": runs["status"],
        "started": runs["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
    })
    return pd.concat([table, runs.filter(regex=r"^(params|metrics)\.")], axis=1)


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per training run: its DVC experiment, key params and test metrics."""
    table = runs[["run_id", "model", "pipeline", "status", "started"]].assign(run_id=runs["run_id"].str[:8])
    # Then every kind's own settings, as its training logged them: model.<key>.
    settings = sorted(c.removeprefix("params.") for c in runs
                      if c.startswith("params.model.") and c != "params.model.kind")
    for key in (*TRAINING_PARAMS, *settings):
        table[key] = runs.get(f"params.{key}")
    for metric in (*(f"test_{m}" for m in STUDY_METRICS), "best_val_loss"):
        table[metric] = metric_column(runs, metric)
    for metric in (f"test_{m}" for m in SET_METRICS):  # FID/KID, where an evaluation computed them
        if f"metrics.{metric}" in runs:
            table[metric] = metric_column(runs, metric)
    return table


def config_columns(runs: pd.DataFrame) -> list[str]:
    """The params of `runs` that define a training configuration."""
    return [c for c in runs.columns if c.startswith("params.") and c not in NOT_CONFIG]


def metric_column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs.get(f"metrics.{name}", pd.Series(np.nan, index=runs.index)).astype(float)


def distinct_trainings(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct training (model + configuration + seed) with test metrics: a configuration
    trained again in another experiment is the same training, counted once (its latest run)."""
    runs = runs[metric_column(runs, "test_psnr").notna()]
    if runs.empty:
        return runs
    key = ["model", *config_columns(runs)]
    return runs.fillna({c: "" for c in key}).drop_duplicates(subset=key, keep="last").reset_index(drop=True)


def filter_params(runs: pd.DataFrame, where: dict[str, str]) -> pd.DataFrame:
    """Runs whose params equal each `key=value` of `where` (params are compared as logged: strings)."""
    for key, value in where.items():
        if f"params.{key}" not in runs.columns:
            raise AevaeError(f"--param {key}={value}: no run logged a param '{key}'; use a params.yaml key "
                             "such as lr or model.kind")
        runs = runs[runs[f"params.{key}"].astype(str) == str(value)]
    return runs


def seed_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """Trainings that differ only in train.seed, grouped: per model and metric the mean and sd across
    seeds, next to the mean half-width of each run's own 95% interval over test images."""
    runs = distinct_trainings(runs)
    if runs.empty:
        raise AevaeError("no model run with test metrics in the store: run dvc repro (or a sweep) first")
    config = [c for c in config_columns(runs) if c != SEED]
    # Shown: what varies between trainings of one model (a param another model never logs is no variation).
    varying = [c for c in config if runs.groupby("model")[c].nunique().max() > 1]
    rows = []
    for keys, group in runs.groupby(["label", *varying], sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = {"model": keys[0], **{c.removeprefix("params."): k for c, k in zip(varying, keys[1:])},
               "seeds": group[SEED].nunique()}
        for metric in METRICS:
            values = metric_column(group, f"test_{metric}")
            if values.isna().all():
                continue
            row[f"{metric} mean"] = values.mean()
            row[f"{metric} sd (seeds)"] = values.std(ddof=1) if len(values) > 1 else math.nan
            high, low = (metric_column(group, f"test_{metric}_ci_{end}") for end in ("high", "low"))
            half_widths = (high - low) / 2
            row[f"{metric} ±95% (images)"] = half_widths.mean()
        rows.append(row)
    return pd.DataFrame(rows)

