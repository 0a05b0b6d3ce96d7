"""Rate and distortion of the models with an ELBO: rate (the KL of the posterior from the prior, nats per
image, the contract's `rate_term`) against test PSNR and MSE, with the models without a rate as references.
Drawn for one study's models by the report, and for separate experiments by `aevae rate-distortion`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from aevae.files.atomic import atomic_path
from aevae.report.trained import Trained

RATE = "rate_nats"  # the points' rate column, whichever term of its ELBO a model names as its rate


def rate_distortion_points(per_seed: pd.DataFrame, trained: list[Trained]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each model with a rate: mean and sd over seeds of its test rate, PSNR and MSE, sorted by rate; the
    models without one, as references), from this pipeline's per-training test means."""
    def summarise(t: Trained) -> dict:
        rows = per_seed[per_seed["model"] == t.name]
        out = {"label": t.label, "seeds": len(rows)}
        for name, column in ((RATE, t.model.rate_term), ("psnr", "psnr"), ("mse", "mse")):
            values = rows[column] if column in rows else pd.Series(dtype=float)
            out[name], out[f"{name}_sd"] = values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan
        return out

    points = pd.DataFrame([summarise(t) for t in trained])
    has_rate = points[RATE].notna()
    return with_steps(points[has_rate]), points[~has_rate].reset_index(drop=True)


def with_steps(rated: pd.DataFrame) -> pd.DataFrame:
    """The points from the highest rate down, each with the PSNR bought per nat of rate since the one before."""
    rated = rated.sort_values(RATE, ascending=False).reset_index(drop=True)
    rated["psnr_db_per_nat"] = rated["psnr"].diff() / rated[RATE].diff()
    return rated


def rate_steps(rated: pd.DataFrame) -> list[str]:
    """One line per step between neighbouring points (rows of `rated`, labelled): what the step costs in
    rate and buys in PSNR."""
    lines = []
    for before, after in zip(rated.itertuples(), rated.iloc[1:].itertuples()):
        lines.append(f"{before.label} -> {after.label}: KL {after.rate_nats - before.rate_nats:+.1f} nats, "
                     f"PSNR {after.psnr - before.psnr:+.2f} dB ({after.psnr_db_per_nat:+.4f} dB per nat of KL; "
                     f"means over {min(before.seeds, after.seeds)}+ seeds)")
    return lines


def plot_rate_distortion(rated: pd.DataFrame, refs: pd.DataFrame, path: Path) -> None:
    """Distortion (test PSNR, and per-pixel MSE) against rate, one labelled point per row of `rated`, with
    the models without a rate (`refs`) as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({int(n) for n in (*rated["seeds"], *refs["seeds"])})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for ax, metric, label in ((axes[0], "psnr", "test PSNR (dB), higher is better"),
                              (axes[1], "mse", "test MSE per pixel, lower is better")):
        ax.errorbar(rated[RATE], rated[metric], xerr=rated[f"{RATE}_sd"].fillna(0),
                    yerr=rated[f"{metric}_sd"].fillna(0), marker="o", capsize=3,
                    label="models with a rate (one point each)")
        for row in rated.itertuples():
            ax.annotate(row.label, (row.rate_nats, getattr(row, metric)), textcoords="offset points",
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
