"""Rate and distortion across separate experiments: every model with an ELBO (the contract's `rate_term`)
at each of its settings (a VAE at several beta, say), mean and sd over training seeds, with the models
without a rate trained alike as references. (One study's own models are in its report.)"""

from __future__ import annotations

import math

import pandas as pd

from aevae import AevaeError
from aevae.compare.runs import SEED, config_columns, distinct_trainings, metric_column
from aevae.models.registry import MODELS
from aevae.report.rate_distortion import RATE, with_steps

SETTINGS = "params.model."  # a training's own model settings, as it logged them


def _rates(runs: pd.DataFrame) -> pd.Series:
    """Each run's test rate: the metric its kind names as its rate, NaN for a kind without one."""
    kinds = runs.get("params.model.kind", pd.Series(None, index=runs.index))
    terms = kinds.map(lambda kind: MODELS[kind].rate_term if kind in MODELS else None)
    values = pd.Series(math.nan, index=runs.index)
    for term in terms.dropna().unique():
        rows = terms == term
        values[rows] = metric_column(runs[rows], f"test_{term}")
    return values


def _summarise(group: pd.DataFrame) -> pd.Series:
    out: dict[str, float] = {"seeds": group[SEED].nunique()}
    for name, values in ((RATE, group[RATE]), ("psnr", metric_column(group, "test_psnr")),
                         ("mse", metric_column(group, "test_mse"))):
        out[name], out[f"{name}_sd"] = values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan
    return pd.Series(out)


def rate_distortion(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each setting of the models with a rate: mean and sd over seeds of rate and distortion, labelled,
    with the model settings that differ as columns; the models without a rate as references). Refuses runs
    with a rate that differ in anything but their model settings and the seed."""
    runs = distinct_trainings(runs)
    runs = runs.assign(**{RATE: _rates(runs)}) if not runs.empty else runs
    if runs.empty or runs[RATE].isna().all():
        raise AevaeError("no training run of a model with a rate (an ELBO) and test metrics in the store: run a "
                         "sweep of such a model first (docs/comparison.md, 'The β trade-off')")
    with_rate = runs[runs[RATE].notna()]
    config = [c for c in config_columns(with_rate) if c != SEED]
    others = [c for c in config if not c.startswith(SETTINGS) and with_rate[c].nunique() > 1]
    if others:
        names = [c.removeprefix("params.") for c in others]
        raise AevaeError(f"the runs with a rate differ in {', '.join(names)} as well as in their model settings: "
                         f"choose one with --param, e.g. --param {names[0]}={with_rate[others[0]].iloc[-1]}")
    # The references: models without a rate trained with the same shared settings (their model.* aside).
    shared = [c for c in config if not c.startswith(SETTINGS)]
    same_setting = (runs[shared] == with_rate[shared].iloc[0]).all(axis=1) if shared else True
    references = runs[runs[RATE].isna() & same_setting]
    varying = [c for c in config if c.startswith(SETTINGS) and with_rate[c].nunique() > 1]
    points = with_rate.groupby(["label", *varying], dropna=False).apply(_summarise, include_groups=False)
    points = with_steps(points.reset_index().rename(columns={c: c.removeprefix("params.") for c in varying}))
    columns = ["label", "seeds", "psnr", "psnr_sd", "mse", "mse_sd"]
    refs = (references.groupby("label").apply(_summarise, include_groups=False).reset_index()
            if not references.empty else pd.DataFrame(columns=columns))  # rate models alone: no reference lines
    points["seeds"], refs["seeds"] = points["seeds"].astype(int), refs["seeds"].astype(int)
    return points, refs[columns]
