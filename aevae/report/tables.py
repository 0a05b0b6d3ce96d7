"""The report's tables: the study's metric table, the paired differences and the architectures."""

from __future__ import annotations

import math

import pandas as pd

from aevae.models.contract import parameter_count
from aevae.report.trained import Trained
from aevae.results.names import LABELS, METRICS, SET_METRICS, fmt


def summary_row(summary: pd.DataFrame, model: str, metric: str) -> pd.Series:
    return summary[(summary["model"] == model) & (summary["metric"] == metric)].iloc[0]


def model_pairs(summary: pd.DataFrame, names: list[str]) -> list[tuple[str, str]]:
    """(a, b) model names of each paired difference `a-b` in the summary, in scoring order."""
    present = set(summary["model"])
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if f"{a}-{b}" in present]


def interval_cell(s: pd.Series, metric: str) -> str:
    """`mean [95% interval]`, with `± sd over seeds` when there are several seeds."""
    text = fmt(s["mean"], metric)
    if not math.isnan(s.get("seed_sd", math.nan)):
        text += f" ± {fmt(s['seed_sd'], metric)}"
    if not math.isnan(s["ci_low"]):
        text += f" [{fmt(s['ci_low'], metric)}, {fmt(s['ci_high'], metric)}]"
    return text


def _set_cell(summary: pd.DataFrame, model: str, metric: str) -> str:
    """A set-level score's cell: `mean ± seed sd`, KID with its sd over subsets; a model without a prior has
    no sample scores."""
    found = summary[(summary["model"] == model) & (summary["metric"] == metric)]
    if found.empty:
        return "no prior" if metric.startswith("sample_") else "n/a"
    text = interval_cell(found.iloc[0], metric)
    subsets = summary[(summary["model"] == model) & (summary["metric"] == f"{metric}_std")]
    return text + (f" (subsets sd {fmt(subsets['mean'].iloc[0], metric)})" if not subsets.empty else "")


def metric_table(summary: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The study's table (Metric | AE | VAE ...), each cell `mean ± seed sd [95% interval]`; FID and KID
    below when they were computed."""
    rows = [{"Metric": LABELS[metric], **{label: interval_cell(summary_row(summary, name, metric), metric)
                                          for name, label in labels.items()}} for metric in METRICS]
    rows += [{"Metric": LABELS[metric], **{label: _set_cell(summary, name, metric) for name, label in labels.items()}}
             for metric in SET_METRICS if (summary["metric"] == metric).any()]
    return pd.DataFrame(rows)


def paired_table(summary: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """One row per pair of models, each metric's paired difference `mean ± seed sd [95% interval]`."""
    return pd.DataFrame([{"Difference (paired)": f"{labels[a]} - {labels[b]}",
                          **{LABELS[m]: interval_cell(summary_row(summary, f"{a}-{b}", m), m) for m in METRICS}}
                         for a, b in model_pairs(summary, list(labels))])


def architecture_rows(trained: list[Trained]) -> pd.DataFrame:
    return pd.DataFrame([{"Model": t.label, "Parameters": f"{parameter_count(t.model):,}",
                          "Bottleneck": t.model.code_size()} for t in trained])

