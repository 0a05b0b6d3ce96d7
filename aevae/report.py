"""The study's answers as files: grid.png, the metric table, curves, samples, worst cases, report.md/html.

Nothing here knows which models it shows: each brings its label, loss unit, code size and whether it
can sample; the order is the order of the training stages in dvc.yaml."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from aevae.data import load_split, read_manifest
from aevae.files import MetricsDir, ModelDir, atomic_path, write_text
from aevae.images import image_grid, save_png, to_uint8, to_unit
from aevae.metrics import HIGHER_IS_BETTER, METRICS, STUDY_METRICS
from aevae.models import Model, load_model, parameter_count
from aevae.params import Params

LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "mse": "MSE (per pixel)"}


# --------------------------------------------------------------------------- figures


@dataclass
class Trained:
    """One evaluated model, as the report needs it."""

    name: str  # its folder and its key in the metric files
    model: Model
    history: pd.DataFrame
    recon: np.ndarray  # uint8 reconstructions of the test split

    @property
    def label(self) -> str:
        return self.model.label

    def best_epoch(self) -> pd.Series:
        return self.history.loc[self.history["val_loss"].idxmin()]


def plot_curves(trained: list[Trained], path: Path) -> None:
    """Each model's loss in its own unit, the per-pixel validation MSE of all (comparable), and the two
    terms of each model whose loss has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_terms = [t for t in trained if {"val_recon", "val_kl"} <= set(t.history.columns)]
    fig, axes = plt.subplots(1, len(trained) + 1 + len(with_terms), figsize=(5 * (len(trained) + 1 + len(with_terms)), 4),
                             constrained_layout=True)
    for ax, t in zip(axes, trained):
        ax.plot(t.history["epoch"], t.history["train_loss"], label="train")
        ax.plot(t.history["epoch"], t.history["val_loss"], label="validation")
        ax.set(title=f"{t.label} loss", xlabel="epoch", ylabel=t.model.loss_unit, yscale="log")
    ax = axes[len(trained)]
    for t in trained:
        ax.plot(t.history["epoch"], t.history["val_mse"], label=t.label)
    ax.set(title="validation MSE (all models)", xlabel="epoch", ylabel="per-pixel MSE", yscale="log")
    for ax, t in zip(axes[len(trained) + 1:], with_terms):
        ax.plot(t.history["epoch"], t.history["val_recon"], label="reconstruction (val)")
        ax.plot(t.history["epoch"], t.history["val_kl"], label="KL (val)")
        ax.set(title=f"{t.label} loss terms", xlabel="epoch", ylabel=t.model.loss_unit, yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def prior_samples(model: Model, test: np.ndarray, n_samples: int, steps: int, seed: int) -> dict[str, np.ndarray]:
    """Images decoded from z ~ N(0, I), and a straight line between two test images' posterior means."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    samples = to_uint8(model.sample(n_samples, generator))
    a, b = torch.randperm(len(test), generator=generator)[:2].tolist()
    ends = np.stack([test[a], test[b]])
    return {"samples": samples, "interpolation": latent_line(model, ends, steps), "ends": ends}


@torch.no_grad()
def latent_line(model: Model, ends: np.ndarray, steps: int) -> np.ndarray:
    """The decoded straight line between two uint8 images' posterior means, `steps` points, ends included."""
    mu = model.eval().encode(to_unit(ends))[0]
    weights = torch.linspace(0, 1, steps).unsqueeze(1)
    return to_uint8(model.decode((1 - weights) * mu[0] + weights * mu[1]))


def grid_picks(n_test: int, n_images: int, seed: int) -> np.ndarray:
    """The test images shown in the grid: drawn at random with the seed, in index order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=min(n_images, n_test), replace=False))


# --------------------------------------------------------------------------- tables and text


def _fmt(value: float, metric: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return {"psnr": f"{value:.2f}", "mse": f"{value:.5f}"}.get(metric, f"{value:.4f}")


def _pairs(summary: pd.DataFrame, labels: dict[str, str]) -> list[tuple[str, str]]:
    """(a, b) model names of each paired difference `a-b` in the summary, in scoring order."""
    names = list(labels)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if f"{a}-{b}" in set(summary["model"])]


def _row(summary: pd.DataFrame, model: str, metric: str) -> pd.Series:
    return summary[(summary["model"] == model) & (summary["metric"] == metric)].iloc[0]


def metric_table(summary: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The study's table (Metric | AE | VAE), each cell `mean [95% interval]`, plus each paired difference."""
    columns = [(name, label) for name, label in labels.items()]
    columns += [(f"{a}-{b}", f"{labels[a]} - {labels[b]} (paired)") for a, b in _pairs(summary, labels)]
    rows = []
    for metric in METRICS:
        row = {"Metric": LABELS[metric]}
        for model, title in columns:
            s = _row(summary, model, metric)
            interval = (f" [{_fmt(s['ci_low'], metric)}, {_fmt(s['ci_high'], metric)}]"
                        if not math.isnan(s["ci_low"]) else "")
            row[title] = _fmt(s["mean"], metric) + interval
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_sentences(summary: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """One paragraph per pair of models: a sentence per metric, saying only what the means and the paired
    interval support."""
    paragraphs = []
    for a_name, b_name in _pairs(summary, labels):
        key, label_a, label_b = f"{a_name}-{b_name}", labels[a_name], labels[b_name]
        sentences = []
        for metric in STUDY_METRICS:
            a, b, diff = _row(summary, a_name, metric), _row(summary, b_name, metric), _row(summary, key, metric)
            if math.isnan(a["mean"]) or math.isnan(b["mean"]):
                sentences.append(f"{LABELS[metric]}, {label_a} vs {label_b}: not available for this run.")
                continue
            better_a = (a["mean"] > b["mean"]) == HIGHER_IS_BETTER[metric]
            (winner, win), (loser, lose) = ((label_a, a), (label_b, b)) if better_a else ((label_b, b), (label_a, a))
            direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
            if diff["ci_low"] > 0 or diff["ci_high"] < 0:
                verdict = "the 95% interval of the paired difference excludes zero, so the gap is not sampling noise"
            else:
                verdict = "the 95% interval of the paired difference includes zero: no reliable difference on this test set"
            sentences.append(f"{LABELS[metric]} ({direction} is better): {winner} {_fmt(win['mean'], metric)} vs "
                             f"{loser} {_fmt(lose['mean'], metric)}; {verdict}.")
        paragraphs.append(" ".join(sentences))
    return paragraphs


def code_size_finding(summary: pd.DataFrame, trained: list[Trained]) -> list[str]:
    """How much of the gap between the study's AE and the generative model remains against an AE with the
    generative model's code size: the paired differences, with their intervals, in plain words."""
    generative = [t for t in trained if t.model.generative]
    deterministic = sorted((t for t in trained if not t.model.generative), key=lambda t: t.model.code_values())
    if not generative or len(deterministic) < 2:
        return []
    g = generative[0]
    equal = next((t for t in deterministic if t.model.code_values() == g.model.code_values()), None)
    large = deterministic[-1]
    if equal is None or equal is large:
        return []
    names = [t.name for t in trained]

    def paired(a: Trained, b: Trained, metric: str) -> tuple[float, float, float]:
        """Mean and interval of a - b (the summary holds the pair in the order the models were scored)."""
        sign = 1 if names.index(a.name) < names.index(b.name) else -1
        first, second = (a, b) if sign == 1 else (b, a)
        row = _row(summary, f"{first.name}-{second.name}", metric)
        low, high = sorted((sign * row["ci_low"], sign * row["ci_high"]))
        return sign * row["mean"], low, high

    sentences = [f"Equal code size: {large.label} keeps {large.model.code_values():,} numbers per image, "
                 f"{equal.label} and the {g.label} {g.model.code_values():,} each."]
    for metric in STUDY_METRICS:
        whole, part = paired(large, g, metric), paired(equal, g, metric)
        if any(math.isnan(v) for v in (*whole, *part)):
            continue
        f = lambda v: _fmt(v, metric)  # noqa: E731
        # A share only means something when both gaps are real and point the same way.
        real = whole[1] * whole[2] > 0 and part[1] * part[2] > 0 and whole[0] * part[0] > 0
        share = f", {100 * part[0] / whole[0]:.0f}% of the whole gap," if real else ""
        sentences.append(
            f"{LABELS[metric]}: {large.label} - {g.label} = {f(whole[0])} [{f(whole[1])}, {f(whole[2])}]; at equal "
            f"code size {equal.label} - {g.label} = {f(part[0])} [{f(part[1])}, {f(part[2])}]{share} remains.")
    sentences.append("Intervals are 95% bootstrap intervals over the test images of one training seed: they leave "
                     "out how much another seed would move each model (run the seed sweep in the README and "
                     "`aevae compare --by-seed` for that).")
    return sentences


# --------------------------------------------------------------------------- the document


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: pd.DataFrame | None = None
    image: str | None = None  # file name in the report folder


def to_markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        if s.table is not None:
            out += [s.table.to_markdown(index=False), ""]
        if s.image:
            out += [f"![{s.title}]({s.image})", ""]
    return "\n".join(out)


def to_html(title: str, sections: list[Section], folder: Path) -> str:
    """A single file: images inlined as base64 so it can be mailed or opened anywhere."""
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{html.escape(p)}</p>" for p in s.paragraphs]
        if s.table is not None:
            body.append(s.table.to_html(index=False, border=0, classes="metrics"))
        if s.image:
            data = base64.b64encode((folder / s.image).read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%;image-rendering:pixelated}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def architecture_rows(trained: list[Trained]) -> pd.DataFrame:
    return pd.DataFrame([{"Model": t.label, "Parameters": f"{parameter_count(t.model):,}",
                          "Bottleneck": t.model.code_size()} for t in trained])


def write_report(folder: Path, sections: list[Section], title: str) -> None:
    write_text(folder / "report.md", to_markdown(title, sections))
    write_text(folder / "report.html", to_html(title, sections, folder))


# --------------------------------------------------------------------------- the stage


def build_report(params: Params, data_dir: Path, models: list[ModelDir], metrics: MetricsDir, out: Path) -> list[Path]:
    """Write every figure, table and the report into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data_dir)
    test = load_split(data_dir, "test")
    trained = [Trained(d.name, load_model(d.best, params.data.image_size)[0], pd.read_csv(d.history),
                       np.load(metrics.reconstructions(d.name))) for d in models]
    labels = {t.name: t.label for t in trained}
    per_image = pd.read_csv(metrics.per_image)
    summary = pd.read_csv(metrics.summary)
    scores = json.loads(metrics.eval_json.read_text(encoding="utf-8"))

    picks = grid_picks(len(test), params.report.grid_images, params.seed)
    with atomic_path(out / "grid.csv") as tmp:
        pd.DataFrame({"column": np.arange(len(picks)), "test_index": picks}).to_csv(tmp, index=False)
    save_png(image_grid({"Ground Truth": test[picks], **{t.label: t.recon[picks] for t in trained}},
                        [f"#{i}" for i in picks]), out / "grid.png")
    plot_curves(trained, out / "curves.png")
    generative = [t for t in trained if t.model.generative]
    if generative:
        gen = prior_samples(generative[0].model, test, params.report.samples, params.report.interpolation_steps,
                            params.seed)
        per_row = math.ceil(len(gen["samples"]) / 2)
        save_png(image_grid({"z ~ N(0, I)": gen["samples"][:per_row], "": gen["samples"][per_row:]}),
                 out / "samples.png")
        steps = len(gen["interpolation"])
        ends = [gen["ends"][0], *[None] * (steps - 2), gen["ends"][1]]  # above the line's first and last step
        save_png(image_grid({"test images": ends, "decoded line": gen["interpolation"]}), out / "interpolation.png")
    worst_rows, worst_titles = {}, []
    for t in trained:
        scores = per_image[per_image["model"] == t.name].nsmallest(5, "psnr")
        idx = scores["index"].to_numpy()
        worst_rows[f"{t.label}: truth"] = test[idx]
        worst_rows[f"{t.label}: output"] = t.recon[idx]
        worst_titles.append(f"{t.label}: " + ", ".join(f"#{i} {p:.1f} dB / SSIM {s:.2f}" for i, p, s in
                                                       zip(idx, scores["psnr"], scores["ssim"])) + ".")
    save_png(image_grid(worst_rows), out / "worst.png")

    table = metric_table(summary, labels)
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    sections = _sections(params, manifest, trained, table, summary, worst_titles, generative, scores)
    write_report(out, sections, "AutoEncoder vs Variational AutoEncoder")
    return sorted(p for p in out.iterdir() if p.is_file())


def _training_summary(t: Trained) -> str:
    best = t.best_epoch()
    text = f"{t.label} epoch {int(best['epoch'])} (val loss {best['val_loss']:.5g} {t.model.loss_unit}"
    if "val_kl" in best:
        text += f", of which KL {best['val_kl']:.1f}"
    if "val_active_units" in best:
        text += f"; {int(best['val_active_units'])} of {t.model.latent_dim} latent dimensions active"
    return text + ")"


def elbo_sentences(trained: list[Trained], scores: dict) -> list[str]:
    """The test ELBO of each model that has one (eval.json), in nats per image."""
    return [f"{t.label} on the test split: reconstruction {scores[t.name]['recon_nats']:.1f} + KL "
            f"{scores[t.name]['kl_nats']:.1f} = {scores[t.name]['neg_elbo_nats']:.1f} nats per image (the negative "
            "ELBO at beta 1, whatever beta it was trained with; z drawn once per image)."
            for t in trained if "neg_elbo_nats" in scores.get(t.name, {})]


def _sections(params, manifest, trained, table, summary, worst_titles, generative, scores) -> list[Section]:
    counts = manifest["counts"]
    source = ("crops of the photographs shipped with scikit-image (" + ", ".join(manifest["photos"]) +
              "); test crops are other regions of the same photographs, regions no training crop touches, and "
              f"no two test images are within {manifest['test_near_duplicate_psnr_db']:g} dB PSNR of each other "
              "(near-duplicates are redrawn). Six photographs are a demo set, not a benchmark: use your own "
              "folder for publishable numbers"
              if manifest["source"] == "builtin" else f"the images in {manifest['path']}, split at random")
    lpips_missing = table.iloc[2][trained[0].label] == "n/a"
    lpips_source = summary.loc[summary["metric"] == "lpips", "source"].iloc[0]
    lpips_note = ("LPIPS is n/a: no AlexNet weights were found that passed their check (see README)."
                  if lpips_missing else f"LPIPS is v0.1 with the AlexNet backbone ({lpips_source}).")
    losses = "; ".join(f"{t.label}: {t.model.loss_unit}" for t in trained)
    sections = [
        Section("Data", [
            f"{counts['train']} training, {counts['val']} validation and {counts['test']} test images of "
            f"{manifest['image_size']}x{manifest['image_size']} RGB: {source}. "
            f"{manifest['skipped_count']} unreadable files skipped. Data sha256 {manifest['sha256'][:16]}."]),
        Section("Models", [
            "All share the study's convolutional encoder (Conv 3-64-128-256, kernel 4, stride 2, BatchNorm, ReLU) "
            "and its mirrored ConvTranspose decoder with a Sigmoid output; they differ in what lies between."],
            table=architecture_rows(trained)),
        Section("Training", [
            f"Adam (lr {params.lr:g}, weight decay {params.weight_decay:g}), batch size {params.batch_size}, "
            f"{params.epochs} epochs, ReduceLROnPlateau on validation loss (factor {params.train.plateau_factor:g}, "
            f"patience {params.train.plateau_patience}), training seed {params.train.seed}. Losses ({losses}); the VAE's per image "
            f"in nats is summed squared error + {params.vae.beta:g} x KL"
            + (f", KL weight warmed up over {params.vae.kl_warmup_epochs} epochs" if params.vae.kl_warmup_epochs else "")
            + ". The best-validation checkpoint of each model is evaluated.",
            "Best epoch: " + "; ".join(_training_summary(t) for t in trained) + "."], image="curves.png"),
        Section("Reconstructions", [
            f"{min(params.report.grid_images, counts['test'])} test images drawn at random (seed {params.seed}; "
            "their indices are in grid.csv). Models with a Gaussian latent reconstruct from its posterior mean, so "
            "every output is deterministic. Tiles are enlarged with nearest-neighbour, adding no blur."], image="grid.png"),
        Section("Metrics on the test set", [
            f"Mean over {counts['test']} test images with a 95% percentile-bootstrap interval "
            f"({params.eval.bootstrap_samples} resamples); the paired columns are the per-image difference "
            "between two models. PSNR is computed per image (data range 1) and then averaged; SSIM uses the "
            f"Gaussian 11x11, sigma 1.5 window; MSE is per pixel; {lpips_note} Every number comes from one "
            f"training seed (train.seed {params.train.seed}).", *elbo_sentences(trained, scores)], table=table),
        Section("Comparison", [*comparison_sentences(summary, {t.name: t.label for t in trained}),
                               *code_size_finding(summary, trained)]),
    ]
    if generative:
        g = generative[0]
        others = " and ".join(f"the {t.label} ({t.model.code_values():,}-value code)" for t in trained
                              if not t.model.generative)
        sections += [
            Section(f"Sampling ({g.label})", [
                "Images decoded from z ~ N(0, I)." + (
                    f" {others[0].upper()}{others[1:]} cannot do this: nothing in their training ties the code "
                    "to a known distribution, so there is no prior to draw codes from, and points between two "
                    "codes need not decode to images." if others else "")], image="samples.png"),
            Section("Interpolation", [
                f"Two test images (top, at the ends) and the {g.label}'s decoding of "
                f"{params.report.interpolation_steps} evenly spaced points on the line between their posterior "
                "means (bottom): the first and last points are the two images' own reconstructions."],
                image="interpolation.png"),
        ]
    sections.append(Section("Worst test images (lowest PSNR)", worst_titles, image="worst.png"))
    return sections
