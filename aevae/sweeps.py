"""The read side of the MLflow store: every training run of every experiment, and what a sweep of
separate experiments says (spread over training seeds, the VAE's rate-distortion trade-off).

Each training run carries every param its training read and the test metrics evaluation logged into it,
so these see every experiment of every machine that logs there. (One study's own seeds and betas are in
its report; these compare across experiments.)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from aevae import AevaeError
from aevae.display import METRICS, SET_METRICS, STUDY_METRICS, TRAINING_PARAMS
from aevae.files import atomic_path
from aevae.store import EXPERIMENT, existing_experiment_id, store_error

SEED = "params.train.seed"
BETA = "params.model.beta"  # a training's configuration is logged as model.<key>
RATE = "metrics.test_kl_nats"  # the rate of a model with an ELBO: KL of its posterior from the prior, nats per image
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
    runs = runs[runs["tags.model_config"].notna()].reset_index(drop=True)
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
    for key in TRAINING_PARAMS:
        table[key] = runs.get(f"params.{key}")
    for metric in (*(f"test_{m}" for m in STUDY_METRICS), "best_val_loss"):
        table[metric] = _metric(runs, metric)
    for metric in (f"test_{m}" for m in SET_METRICS):  # FID/KID, where an evaluation computed them
        if f"metrics.{metric}" in runs:
            table[metric] = _metric(runs, metric)
    return table


def _config_columns(runs: pd.DataFrame) -> list[str]:
    """The params of `runs` that define a training configuration."""
    return [c for c in runs.columns if c.startswith("params.") and c not in NOT_CONFIG]


def _metric(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs.get(f"metrics.{name}", pd.Series(np.nan, index=runs.index)).astype(float)


def distinct_trainings(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct training (model + configuration + seed) with test metrics: a configuration
    trained again in another experiment is the same training, counted once (its latest run)."""
    runs = runs[_metric(runs, "test_psnr").notna()]
    if runs.empty:
        return runs
    key = ["model", *_config_columns(runs)]
    return runs.fillna({c: "" for c in key}).drop_duplicates(subset=key, keep="last").reset_index(drop=True)


def filter_params(runs: pd.DataFrame, where: dict[str, str]) -> pd.DataFrame:
    """Runs whose params equal each `key=value` of `where` (params are compared as logged: strings)."""
    for key, value in where.items():
        if f"params.{key}" not in runs.columns:
            raise AevaeError(f"--param {key}={value}: no run logged a param '{key}'; use a params.yaml key "
                             "such as lr or model.beta")
        runs = runs[runs[f"params.{key}"].astype(str) == str(value)]
    return runs


def seed_groups(runs: pd.DataFrame) -> pd.DataFrame:
    """Trainings that differ only in train.seed, grouped: per model and metric the mean and sd across
    seeds, next to the mean half-width of each run's own 95% interval over test images."""
    runs = distinct_trainings(runs)
    if runs.empty:
        raise AevaeError("no model run with test metrics in the store: run dvc repro (or a sweep) first")
    config = [c for c in _config_columns(runs) if c != SEED]
    # Shown: what varies between trainings of one model (a param another model never logs is no variation).
    varying = [c for c in config if runs.groupby("model")[c].nunique().max() > 1]
    rows = []
    for keys, group in runs.groupby(["label", *varying], sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = {"model": keys[0], **{c.removeprefix("params."): k for c, k in zip(varying, keys[1:])},
               "seeds": group[SEED].nunique()}
        for metric in METRICS:
            values = _metric(group, f"test_{metric}")
            if values.isna().all():
                continue
            row[f"{metric} mean"] = values.mean()
            row[f"{metric} sd (seeds)"] = values.std(ddof=1) if len(values) > 1 else math.nan
            half_widths = (_metric(group, f"test_{metric}_ci_high") - _metric(group, f"test_{metric}_ci_low")) / 2
            row[f"{metric} ±95% (images)"] = half_widths.mean()
        rows.append(row)
    return pd.DataFrame(rows)


def rate_distortion(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the VAE at each beta: mean and sd over seeds of rate and distortion; the deterministic models'
    distortion as references). Refuses runs that differ in anything but beta and the seed."""
    runs = distinct_trainings(runs)
    if runs.empty or RATE not in runs or runs[RATE].isna().all():
        raise AevaeError("no training run with a test KL in the store: run a beta sweep first (README, "
                         "'The beta trade-off')")
    with_rate = runs[runs[RATE].notna()]
    others = [c for c in _config_columns(with_rate) if c not in (SEED, BETA) and with_rate[c].nunique() > 1]
    if others:
        names = [c.removeprefix("params.") for c in others]
        raise AevaeError(f"the VAE runs differ in {', '.join(names)} as well as in model.beta: choose one "
                         f"setting with --param, e.g. --param {names[0]}={with_rate[others[0]].iloc[-1]}")
    # The references: models without a rate trained with the VAEs' shared settings (their model.* aside).
    shared = [c for c in _config_columns(with_rate) if c not in (SEED, BETA) and not c.startswith("params.model.")]
    same_setting = (runs[shared] == with_rate[shared].iloc[0]).all(axis=1) if shared else True
    references = runs[runs[RATE].isna() & same_setting]

    def summarise(group: pd.DataFrame) -> pd.Series:
        out: dict[str, float] = {"seeds": group[SEED].nunique()}
        for name in ("kl_nats", "psnr", "mse"):
            values = _metric(group, f"test_{name}")
            out[name], out[f"{name}_sd"] = values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan
        return pd.Series(out)

    vae = with_rate.assign(beta=with_rate[BETA].astype(float)).groupby("beta").apply(
        summarise, include_groups=False).reset_index().sort_values("beta")
    # What each step of beta buys: the change in PSNR per nat of KL from the next smaller beta.
    vae["label"] = [f"beta {beta:g}" for beta in vae["beta"]]
    vae["psnr_db_per_kl_nat"] = vae["psnr"].diff() / vae["kl_nats"].diff()
    columns = ["label", "seeds", "psnr", "psnr_sd", "mse", "mse_sd"]
    refs = (references.groupby("label").apply(summarise, include_groups=False).reset_index()
            if not references.empty else pd.DataFrame(columns=columns))  # VAE runs alone: no reference lines
    vae["seeds"], refs["seeds"] = vae["seeds"].astype(int), refs["seeds"].astype(int)
    return vae.reset_index(drop=True), refs[columns]


def beta_steps(vae: pd.DataFrame) -> list[str]:
    """One line per step between neighbouring points (rows of `vae`, labelled): what the step costs in KL
    and buys in PSNR."""
    lines = []
    for before, after in zip(vae.itertuples(), vae.iloc[1:].itertuples()):
        lines.append(f"{before.label} -> {after.label}: KL {after.kl_nats - before.kl_nats:+.1f} nats, "
                     f"PSNR {after.psnr - before.psnr:+.2f} dB ({after.psnr_db_per_kl_nat:+.4f} dB per nat of KL; "
                     f"means over {min(before.seeds, after.seeds)}+ seeds)")
    return lines


def plot_rate_distortion(vae: pd.DataFrame, refs: pd.DataFrame, path: Path) -> None:
    """Distortion (test PSNR, and per-pixel MSE) against rate (test KL), one labelled point per row of
    `vae`, with the models without a rate (`refs`) as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({int(n) for n in (*vae["seeds"], *refs["seeds"])})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, metric, label in ((axes[0], "psnr", "test PSNR (dB), higher is better"),
                              (axes[1], "mse", "test MSE per pixel, lower is better")):
        ax.errorbar(vae["kl_nats"], vae[metric], xerr=vae["kl_nats_sd"].fillna(0), yerr=vae[f"{metric}_sd"].fillna(0),
                    marker="o", capsize=3, label="models with a rate (one point each)")
        for row in vae.itertuples():
            ax.annotate(row.label, (row.kl_nats, getattr(row, metric)), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        for ref, color in zip(refs.itertuples(), ("tab:red", "tab:green", "tab:purple")):
            ax.axhline(getattr(ref, metric), color=color, linestyle="--", label=f"{ref.label} ({ref.seeds:g} seeds)")
        ax.set(xlabel="rate: test KL, nats per image", ylabel=label, xscale="log")
        if metric == "mse":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("rate-distortion; error bars: sd over training seeds "
                 f"({'/'.join(map(str, seeds))} seeds per point)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
