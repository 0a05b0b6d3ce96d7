"""The report's Likelihood section: each model with an ELBO as a density model, in bits/dim with intervals,
how loose its ELBO is, the decoder sd it was scored under, and how much of its latent it uses (latents.png).
Read from the evaluation's files (summary.csv, per_seed.csv, latents.csv, eval.json)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from aevae.files.atomic import atomic_path
from aevae.report.document import Section
from aevae.report.tables import interval_cell
from aevae.report.trained import Trained
from aevae.results.names import LABELS, LIKELIHOOD_METRICS, fmt

RAW_BYTES_BPD = 8.0  # storing the bytes as they are: a uniform distribution over 256 values
ANCHORS = ("For scale only, on other data with far larger models: NVAE reaches 2.91 bits/dim on CIFAR-10 "
           "(Vahdat & Kautz 2020) and VDVAE 3.52 on ImageNet 64x64 (Child 2021); 8 bits/dim is what the raw bytes "
           "cost, so a model above 8 describes the images worse than no model at all. Compare these numbers with "
           "each other, on this test split.")
AT_PRIOR_NATS = 0.01  # a dimension whose mean KL is below this sits at the prior
KL_SHARE = 0.9  # the report says how many dimensions hold this share of the KL


def plot_latent_kl(latents: pd.DataFrame, trained: list[Trained], seed: int, path: Path) -> None:
    """latents.png: each latent model's KL per dimension (training seed `seed`), largest first, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [t for t in trained if ((latents["model"] == t.name) & (latents["seed"] == seed)).any()]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 3.5), constrained_layout=True, squeeze=False)
    for ax, t in zip(axes[0], shown):
        rows = latents[(latents["model"] == t.name) & (latents["seed"] == seed)].sort_values("dim_kl_nats",
                                                                                             ascending=False)
        active = (rows["mean_variance"] > 0.01).to_numpy()
        kl, x = np.maximum(rows["dim_kl_nats"].to_numpy(), 1e-4), np.arange(len(rows))
        ax.bar(x[active], kl[active], width=1.0, color="tab:blue", label=f"active ({active.sum()})")
        if (~active).any():
            ax.bar(x[~active], kl[~active], width=1.0, color="tab:gray", label=f"inactive ({(~active).sum()})")
        ax.axhline(AT_PRIOR_NATS, color="tab:red", linestyle="--", linewidth=1, label="at the prior below this")
        ax.set(title=f"{t.label}: KL per latent dimension, sorted", xlabel="latent dimension (largest KL first)",
               ylabel="KL (nats, mean over test images)", yscale="log")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _table(summary: pd.DataFrame, per_seed: pd.DataFrame, names: list[tuple[str, str]]) -> pd.DataFrame:
    rows = []
    for name, label in names:
        found = summary[summary["model"] == name].set_index("metric")
        seeds = per_seed[per_seed["model"] == name]
        row = {"Model": label}
        row.update({LABELS[m]: interval_cell(found.loc[m], m) if m in found.index else "n/a"
                    for m in LIKELIHOOD_METRICS})
        row["Decoder sd (calibrated; training's)"] = (
            f"{_mean_sd(seeds['sigma'], '.4f')}; " +
            (_mean_sd(seeds["trained_sigma"], ".4f") if seeds["trained_sigma"].notna().all() else "none"))
        row["Active units"] = f"{_mean_sd(seeds['active_units'], '.1f')} of {int(seeds['latent_dim'].iloc[0])}"
        row["I(x; z) (nats)"] = _mean_sd(seeds["mutual_information_nats"], ".2f")
        rows.append(row)
    return pd.DataFrame(rows)


def _mean_sd(values: pd.Series, spec: str) -> str:
    """Mean over seeds, ± their sd when there are several."""
    text = format(float(values.mean()), spec)
    return text + (f" ± {format(float(values.std(ddof=1)), spec)}" if len(values) > 1 else "")


def _collapse_words(label: str, seeds: pd.DataFrame, latents: pd.DataFrame, test_images: int) -> str:
    """What the latent's use means, in words: active units, where the KL sits, the mutual information."""
    latent_dim, active = int(seeds["latent_dim"].iloc[0]), seeds["active_units"].astype(int).tolist()
    per_seed = "" if len(active) == 1 else f" (per seed: {', '.join(map(str, active))})"
    holding = sorted({_dims_holding(rows["dim_kl_nats"].to_numpy()) for _, rows in latents.groupby("seed")})
    at_prior = sorted({int((rows["dim_kl_nats"] < AT_PRIOR_NATS).sum()) for _, rows in latents.groupby("seed")})
    prior = str(at_prior[0]) if len(at_prior) == 1 else f"{at_prior[0]} to {at_prior[-1]}"
    held = str(holding[0]) if len(holding) == 1 else f"{holding[0]} to {holding[-1]}"
    mi, bound = float(seeds["mutual_information_nats"].mean()), math.log(test_images)
    ceiling = (f", and it is {'at' if mi > 0.99 * bound else 'near'} that ceiling: the code tells the test images "
               "apart, and only more test images would measure how much more it holds" if mi > 0.9 * bound else "")
    return (f"{label}: {round(float(np.mean(active)))} of {latent_dim} latent dimensions carry information"
            f"{per_seed}: their posterior mean varies across test images (variance above 0.01, Burda et al. 2016). "
            + (f"None sits at the prior (KL below {AT_PRIOR_NATS:g} nats): no dimension has collapsed; "
               if at_prior == [0] else f"{prior} sit at the prior (KL below {AT_PRIOR_NATS:g} nats), collapsed; ")
            + f"{held} dimensions hold {KL_SHARE:.0%} of the KL (latents.png). "
            f"The mutual information between image and code is {mi:.2f} nats; with {test_images} test images this "
            f"estimator cannot show more than log {test_images} = {bound:.2f} nats{ceiling}.")


def _dims_holding(kl: np.ndarray) -> int:
    """How many dimensions, largest KL first, hold KL_SHARE of the total."""
    kl = np.sort(kl)[::-1]
    return int(np.searchsorted(np.cumsum(kl), KL_SHARE * kl.sum()) + 1) if kl.sum() > 0 else 0


def _trained_sd_words(label: str, found: pd.DataFrame, seeds: pd.DataFrame) -> str:
    """What the calibration changes: bits/dim at the sd the training loss implied."""
    if "bpd_trained" not in found.index:
        return f"{label}: its training loss implies no finite decoder sd, so only the calibrated one is scored."
    at_trained, calibrated = found.loc["bpd_trained", "mean"], found.loc["bpd", "mean"]
    sd = float(seeds["trained_sigma"].mean())
    worse = (f", more than the {RAW_BYTES_BPD:g} bits/dim of the raw bytes" if at_trained > RAW_BYTES_BPD else "")
    return (f"{label}: under the sd its training loss implied ({sd:.4f} on [0, 1] pixels) the same model scores "
            f"{fmt(at_trained, 'bpd')} bits/dim{worse}; under the calibrated sd {fmt(calibrated, 'bpd')}.")


def likelihood_section(trained: list[Trained], result: dict, summary: pd.DataFrame, per_seed: pd.DataFrame,
                       latents: pd.DataFrame) -> Section | None:
    """The section, or None when no model of the study has an ELBO."""
    names = [(t.name, t.label) for t in trained if t.model.has_elbo and (summary["model"] == t.name).any()
             and (summary[summary["model"] == t.name]["metric"] == "bpd").any()]
    if not names:
        return None
    method, n = result["likelihood"], int(result["test_images"])
    paragraphs = [
        f"Each model with an ELBO as a density model of the test images' bytes: p(x|z) is a {method['decoder']}, "
        f"around the decoder's mean, with {method['sigma']}. Bits/dim is -log p(x) / (D ln 2), D = 3 x H x W, per "
        f"test image, then averaged; the IWAE bound (Burda et al. 2016) uses k = {method['iwae_samples']} draws "
        "from the posterior per image and lies below log p(x) in expectation, so its bits/dim bound the model's "
        "true bits/dim from above; the ELBO is the same draws' mean log-weight. Their gap is how loose the ELBO is. "
        "Intervals as in the metric table.",
        *(_trained_sd_words(label, summary[summary["model"] == name].set_index("metric"),
                            per_seed[per_seed["model"] == name]) for name, label in names),
        *(_collapse_words(label, per_seed[per_seed["model"] == name], latents[latents["model"] == name], n)
          for name, label in names),
        ANCHORS,
    ]
    return Section("Likelihood", paragraphs, table=_table(summary, per_seed, names), image="latents.png")
