"""The report's Tuning section: the protocol every configuration was tuned under, what each chose, and
every trial in a figure (tuning.png). Read from the tuning stages' files (tuned/<configuration>.json and
.csv); with tune.trials: 0 there is no section and the report is as before."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from aevae.files.atomic import atomic_path
from aevae.report.document import Section


@dataclass
class Tuning:
    """One configuration's tuning: tuned/<configuration>.json (`chosen`) and every trial (`trials`)."""

    name: str
    label: str
    chosen: dict
    trials: pd.DataFrame


def read_tunings(tuned: Path | None, labels: dict[str, str]) -> list[Tuning]:
    """The tunings of the study's configurations that ran trials (none when tuning is off)."""
    found = []
    for name, label in labels.items():
        path = Path(tuned) / f"{name}.json" if tuned else None
        if path is None or not path.exists():
            continue
        chosen = json.loads(path.read_text(encoding="utf-8"))
        if chosen.get("trials"):
            found.append(Tuning(name, label, chosen, pd.read_csv(path.with_suffix(".csv"))))
    return found


def plot_tuning(tunings: list[Tuning], path: Path) -> None:
    """Each configuration's trials: the objective against the first key of its space (lr by default), the
    range over seeds as error bars, the chosen trial marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tunings), figsize=(5 * len(tunings), 4), constrained_layout=True, squeeze=False)
    for ax, t in zip(axes[0], tunings, strict=True):
        key, trials = t.chosen["space"][0], t.trials
        seeds = trials[[c for c in trials if c.startswith("value_seed")]]
        spread = [trials["value"] - seeds.min(axis=1), seeds.max(axis=1) - trials["value"]]
        ax.errorbar(trials[key], trials["value"], yerr=spread, fmt="o", capsize=3, label="trial (range over seeds)")
        best = trials[trials["chosen"]]
        ax.plot(best[key], best["value"], "r*", markersize=14, label="chosen")
        log = t.chosen["protocol"]["space"][key].get("log", False)
        ax.set(title=f"{t.label}", xlabel=key, ylabel="mean best validation loss", xscale="log" if log else "linear")
        ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _range(r: dict) -> str:
    return f"{r['low']:g}..{r['high']:g}" + (" (log scale)" if r.get("log") else "")


def tuning_section(tunings: list[Tuning]) -> Section:
    """The protocol, then one row per configuration: its chosen settings and value."""
    p = tunings[0].chosen["protocol"]
    space = "; ".join(f"{key} {_range(r)}" for key, r in p["space"].items())
    epochs = p["epochs"] or "the study's"
    protocol = (
        f"Every configuration was tuned with the same budget before the study: {p['trials']} trials over {space}, "
        f"drawn by Optuna's TPE sampler (seed {p['sampler_seed']}; the first {p['startup_trials']} at random), a "
        f"key tuned where the configuration has it. Each trial trained once per seed "
        f"{', '.join(map(str, p['seeds']))} for {epochs} epochs and scored the mean of the "
        "trainings' best validation losses, each in the model's own loss unit; the test split was never read. "
        "The study's trainings use each configuration's chosen settings; the figure shows every trial.")
    rows = pd.DataFrame([{
        "model": t.label,
        "chosen": ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in t.chosen["settings"].items()),
        "trial": f"{t.chosen['best_trial'] + 1} of {len(t.trials)}",
        "best value": f"{t.chosen['best_value']:.5g}",
        "values of all trials": f"{t.trials['value'].min():.5g} .. {t.trials['value'].max():.5g}",
    } for t in tunings])
    return Section("Tuning", [protocol, "Values are comparable within a row's model only: the losses of "
                              "different kinds have different units."], table=rows, image="tuning.png")
