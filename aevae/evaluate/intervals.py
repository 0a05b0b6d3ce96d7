"""Intervals that cover both the training seeds and the test set's independent units, and the tables
built from them: each model's means, the paired differences of every two models, each training's means."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from aevae.results.names import FID_METRICS, METRICS, PER_IMAGE_METRICS


def crossed_bootstrap(values: np.ndarray, units: np.ndarray, samples: int, seed: int) -> dict[str, float]:
    """Mean of a (seeds x images) array, its sd over seeds, and a 95% interval that resamples the seeds
    and the independent units (clusters of images) independently, with replacement.

    The mean is the mean over seeds of each seed's image mean. A resample draws seeds and units; its
    statistic is the mean over the drawn seeds of the images in the drawn units. Images of one unit (crops
    of one region of one photograph) are not independent, so resampling images would give intervals
    narrower than the evidence; with one seed the interval covers the test set only."""
    values = np.asarray(values, dtype=float)
    n_seeds = len(values)
    codes, unit_index = np.unique(units, return_inverse=True)
    n_units = len(codes)
    mean = float(values.mean()) if values.size else math.nan
    seed_sd = float(values.mean(axis=1).std(ddof=1)) if n_seeds > 1 else math.nan
    out = {"mean": mean, "seed_sd": seed_sd, "ci_low": math.nan, "ci_high": math.nan,
           "seeds": n_seeds, "units": n_units}
    if np.isnan(values).any() or n_units < 2:
        out["mean"] = mean if not np.isnan(values).any() else math.nan
        return out
    sums = np.stack([np.bincount(unit_index, weights=row, minlength=n_units) for row in values])  # seeds x units
    sizes = np.bincount(unit_index, minlength=n_units).astype(float)
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    for start in range(0, samples, 256):  # blocks keep the weight matrices small for large test sets
        b = min(256, samples - start)
        w_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b).astype(float)
        w_unit = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=b).astype(float)
        total = np.einsum("bs,su,bu->b", w_seed, sums, w_unit)
        stats[start: start + b] = total / (w_seed.sum(axis=1) * (w_unit @ sizes))
    out["ci_low"], out["ci_high"] = (float(q) for q in np.percentile(stats, [2.5, 97.5]))
    return out


def _grid(frame: pd.DataFrame, metric: str, index: np.ndarray) -> np.ndarray:
    """(seeds x images) values of one model's metric, images in test order."""
    return frame.pivot(index="seed", columns="index", values=metric).reindex(columns=index).to_numpy()


def scored_metrics(frame: pd.DataFrame) -> list[str]:
    """The per-image metrics a model has: every one of METRICS (LPIPS may be all NaN: missing weights), and
    the likelihood's where the model has an ELBO."""
    return [m for m in PER_IMAGE_METRICS if m in frame and (m in METRICS or frame[m].notna().any())]


def summarize(per_image: pd.DataFrame, units: list[str], samples: int, seed: int) -> pd.DataFrame:
    """One row per (model, metric), plus the paired difference `a-b` of every pair of models (in the order
    they were scored), per metric both have, matched by seed and test image."""
    index, units = np.arange(len(units)), np.asarray(units)
    rows = []
    models = list(dict.fromkeys(per_image["model"]))
    frames = {m: per_image[per_image["model"] == m] for m in models}
    for model in models:
        for metric in scored_metrics(frames[model]):
            rows.append({"model": model, "metric": metric,
                         **crossed_bootstrap(_grid(frames[model], metric, index), units, samples, seed)})
    for a, b in itertools.combinations(models, 2):
        shared = set(frames[a]["seed"]) & set(frames[b]["seed"])  # pairs matched by seed and image
        for metric in (m for m in scored_metrics(frames[a]) if m in scored_metrics(frames[b])):
            first, second = (_grid(frames[m][frames[m]["seed"].isin(shared)], metric, index) for m in (a, b))
            rows.append({"model": f"{a}-{b}", "metric": metric,
                         **crossed_bootstrap(first - second, units, samples, seed)})
    return pd.DataFrame(rows)


def per_seed_table(per_image: pd.DataFrame, extra: dict[tuple[str, int], dict[str, float]], samples: int,
                   seed: int) -> pd.DataFrame:
    """Each training's test means: one row per (model, seed) with each metric, its 95% interval over the
    test set's units (<metric>_ci_low/high) and its set-level scores (`extra`: the ELBO terms of a model
    that has them, FID and KID when computed)."""
    rows = []
    for (model, training_seed), group in per_image.groupby(["model", "seed"], sort=False):
        row = {"model": model, "seed": training_seed}
        for metric in scored_metrics(group):
            stats = crossed_bootstrap(group[metric].to_numpy()[None], group["unit"].to_numpy(), samples, seed)
            row.update({metric: stats["mean"], f"{metric}_ci_low": stats["ci_low"],
                        f"{metric}_ci_high": stats["ci_high"]})
        rows.append({**row, **extra.get((model, training_seed), {})})
    return pd.DataFrame(rows)


def set_level_rows(per_seed: pd.DataFrame) -> pd.DataFrame:
    """summary.csv's rows for the set-level scores (FID, KID): mean and sd over seeds, no bootstrap
    interval (resampling images biases FID)."""
    rows = []
    for model, group in per_seed.groupby("model", sort=False):
        for metric in FID_METRICS:
            if metric in group and group[metric].notna().all():
                values = group[metric].to_numpy()
                rows.append({"model": model, "metric": metric, "mean": float(values.mean()),
                             "seed_sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                             "ci_low": math.nan, "ci_high": math.nan, "seeds": len(values), "units": math.nan})
    return pd.DataFrame(rows)


