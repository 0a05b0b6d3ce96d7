"""The study's answers as files: grid.png, the metric tables, curves, samples, worst cases, report.md/html.

Nothing here knows which models it shows: each brings its label, loss unit, code size, ELBO and whether
it can sample (aevae.models); the order is the order of `models:` in params.yaml. Every claim is bounded
by the evidence: intervals cover the training seeds and the test set's independent units, and with one
seed the report says that the seed spread is unmeasured."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aevae.checkpoints import load_model
from aevae.data import load_split, read_manifest, read_test_units
from aevae.display import HIGHER_IS_BETTER, INTERVAL_METHOD, LABELS, METRICS, SET_METRICS, STUDY_METRICS, fmt
from aevae.document import Section, write_report
from aevae.figures import draw_samples, grid_picks, plot_curves
from aevae.files import MetricsDir, ModelDir, atomic_path
from aevae.images import image_grid, save_png
from aevae.models import Model, parameter_count
from aevae.params import Params
from aevae.sweeps import beta_steps, plot_rate_distortion

# --------------------------------------------------------------------------- figures


@dataclass
class Trained:
    """One model configuration of the study, as the report shows it: its first seed's training."""

    name: str  # the configuration's name: its folder and its key in the metric files
    model: Model
    history: pd.DataFrame
    recon: np.ndarray  # uint8 reconstructions of the test split
    label: str

    def best_epoch(self) -> pd.Series:
        return self.history.loc[self.history["val_loss"].idxmin()]


def unique_labels(models: dict[str, Model]) -> dict[str, str]:
    """Each configuration's label; where two configurations share one, their names are added."""
    labels = {name: model.label for name, model in models.items()}
    counts = pd.Series(list(labels.values())).value_counts()
    return {name: label if counts[label] == 1 else f"{label} ({name})" for name, label in labels.items()}


# --------------------------------------------------------------------------- tables and text


def _row(summary: pd.DataFrame, model: str, metric: str) -> pd.Series:
    return summary[(summary["model"] == model) & (summary["metric"] == metric)].iloc[0]


def _pairs(summary: pd.DataFrame, names: list[str]) -> list[tuple[str, str]]:
    """(a, b) model names of each paired difference `a-b` in the summary, in scoring order."""
    present = set(summary["model"])
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if f"{a}-{b}" in present]


def _cell(s: pd.Series, metric: str) -> str:
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
    text = _cell(found.iloc[0], metric)
    subsets = summary[(summary["model"] == model) & (summary["metric"] == f"{metric}_std")]
    return text + (f" (subsets sd {fmt(subsets['mean'].iloc[0], metric)})" if not subsets.empty else "")


def metric_table(summary: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """The study's table (Metric | AE | VAE ...), each cell `mean ± seed sd [95% interval]`; FID and KID
    below when they were computed."""
    rows = [{"Metric": LABELS[metric], **{label: _cell(_row(summary, name, metric), metric)
                                          for name, label in labels.items()}} for metric in METRICS]
    rows += [{"Metric": LABELS[metric], **{label: _set_cell(summary, name, metric) for name, label in labels.items()}}
             for metric in SET_METRICS if (summary["metric"] == metric).any()]
    return pd.DataFrame(rows)


def paired_table(summary: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """One row per pair of models, each metric's paired difference `mean ± seed sd [95% interval]`."""
    return pd.DataFrame([{"Difference (paired)": f"{labels[a]} - {labels[b]}",
                          **{LABELS[m]: _cell(_row(summary, f"{a}-{b}", m), m) for m in METRICS}}
                         for a, b in _pairs(summary, list(labels))])


def _evidence(seeds: int) -> str:
    """What a paired interval that excludes zero shows, given the seeds behind it."""
    if seeds > 1:
        return f"the 95% interval over {seeds} training seeds and the test set's units excludes zero"
    return "the 95% interval over the test set's units excludes zero for this one training seed"


ONE_SEED_CAVEAT = ("With one training seed every interval here covers the test set only: the spread between seeds "
                   "is unmeasured and may be larger than these gaps (add seeds with train.seeds: [0, 1, 2]).")


def comparison_sentences(summary: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """One paragraph per pair of models: a sentence per metric, saying only what the means and the paired
    interval support."""
    paragraphs = []
    for a_name, b_name in _pairs(summary, list(labels)):
        key, label_a, label_b = f"{a_name}-{b_name}", labels[a_name], labels[b_name]
        sentences = []
        for metric in STUDY_METRICS:
            a, b, diff = _row(summary, a_name, metric), _row(summary, b_name, metric), _row(summary, key, metric)
            if math.isnan(a["mean"]) or math.isnan(b["mean"]) or math.isnan(diff["ci_low"]):
                sentences.append(f"{LABELS[metric]}, {label_a} vs {label_b}: not available for this run.")
                continue
            better_a = (a["mean"] > b["mean"]) == HIGHER_IS_BETTER[metric]
            (winner, win), (loser, lose) = ((label_a, a), (label_b, b)) if better_a else ((label_b, b), (label_a, a))
            direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
            if diff["ci_low"] > 0 or diff["ci_high"] < 0:
                verdict = _evidence(int(diff["seeds"]))
            else:
                verdict = "the 95% interval of the paired difference includes zero: no reliable difference"
            sentences.append(f"{LABELS[metric]} ({direction} is better): {winner} {fmt(win['mean'], metric)} vs "
                             f"{loser} {fmt(lose['mean'], metric)}; {verdict}.")
        paragraphs.append(" ".join(sentences))
    if paragraphs and (summary["seeds"] == 1).all():
        paragraphs.append(ONE_SEED_CAVEAT)
    return paragraphs


def code_size_finding(summary: pd.DataFrame, trained: list[Trained]) -> list[str]:
    """For each generative model: how much of the gap between the largest-code deterministic model and it
    remains against a deterministic model with its code size, in plain words."""
    names = [t.name for t in trained]
    deterministic = sorted((t for t in trained if not t.model.generative), key=lambda t: t.model.code_values())
    sentences = []

    def paired(a: Trained, b: Trained, metric: str) -> tuple[float, float, float]:
        """Mean and interval of a - b (the summary holds the pair in the order the models were scored)."""
        sign = 1 if names.index(a.name) < names.index(b.name) else -1
        first, second = (a, b) if sign == 1 else (b, a)
        row = _row(summary, f"{first.name}-{second.name}", metric)
        low, high = sorted((sign * row["ci_low"], sign * row["ci_high"]))
        return sign * row["mean"], low, high

    for g in (t for t in trained if t.model.generative):
        equal = next((t for t in deterministic if t.model.code_values() == g.model.code_values()), None)
        large = deterministic[-1] if deterministic else None
        if equal is None or equal is large:
            continue
        sentences.append(f"Equal code size: {large.label} keeps {large.model.code_values():,} numbers per image, "
                         f"{equal.label} and the {g.label} {g.model.code_values():,} each.")
        for metric in STUDY_METRICS:
            whole, part = paired(large, g, metric), paired(equal, g, metric)
            if any(math.isnan(v) for v in (*whole, *part)):
                continue
            f = lambda v, m=metric: fmt(v, m)
            # A share only means something when both gaps are real and point the same way.
            real = whole[1] * whole[2] > 0 and part[1] * part[2] > 0 and whole[0] * part[0] > 0
            share = f", {100 * part[0] / whole[0]:.0f}% of the whole gap," if real else ""
            sentences.append(
                f"{LABELS[metric]}: {large.label} - {g.label} = {f(whole[0])} [{f(whole[1])}, {f(whole[2])}]; at "
                f"equal code size {equal.label} - {g.label} = {f(part[0])} [{f(part[1])}, {f(part[2])}]{share} "
                "remains.")
    return sentences


def rate_distortion_points(per_seed: pd.DataFrame, trained: list[Trained]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each model with a rate: mean and sd over seeds of test KL, PSNR and MSE, sorted by rate; the
    models without one, as references), from this pipeline's per-training test means."""
    def summarise(t: Trained) -> dict:
        rows = per_seed[per_seed["model"] == t.name]
        out = {"label": t.label, "seeds": len(rows)}
        for name in ("kl_nats", "psnr", "mse"):
            values = rows[name] if name in rows else pd.Series(dtype=float)
            out[name], out[f"{name}_sd"] = values.mean(), values.std(ddof=1) if len(values) > 1 else math.nan
        return out

    points = pd.DataFrame([summarise(t) for t in trained])
    has_rate = points["kl_nats"].notna()
    rated = points[has_rate].sort_values("kl_nats", ascending=False).reset_index(drop=True)
    rated["psnr_db_per_kl_nat"] = rated["psnr"].diff() / rated["kl_nats"].diff()
    return rated, points[~has_rate].reset_index(drop=True)


def fid_sentences(result: dict) -> list[str]:
    """What the FID/KID rows mean, where their weights came from, or why they are missing (eval.json's fid_kid)."""
    status, n = result["fid_kid"], result["test_images"]
    if not status["computed"]:
        return [f"FID and KID: {status['status']}."]
    return [f"rFID and rKID compare each model's reconstructions with the {n} test images, Sample FID and KID as many "
            f"images decoded from seeded prior draws, on Inception-v3 pool features (weights: {status['source']}, "
            f"sha256 {status['sha256'][:12]}...; {status['preprocessing']}). FID is biased upward when the sets are "
            f"small (published FIDs use 50,000 images; Binkowski et al. 2018): with {n} images these values sit well "
            "above what the same models would score on 50,000, so compare them only with each other on this test "
            "set. KID is unbiased at any size, which is why it is here; its subsets sd is over "
            "random subsets of half the images. Every feature set is in metrics/inception/."]


def elbo_sentences(trained: list[Trained], result: dict) -> list[str]:
    """The test ELBO of each model that has one (eval.json, means over seeds), in nats per image."""
    return [f"{t.label} on the test split: reconstruction {result[t.name]['recon_nats']:.1f} + KL "
            f"{result[t.name]['kl_nats']:.1f} = {result[t.name]['neg_elbo_nats']:.1f} nats per image (the negative "
            "ELBO at beta 1, whatever beta it was trained with; z drawn once per image; mean over seeds)."
            for t in trained if "neg_elbo_nats" in result.get(t.name, {})]


# --------------------------------------------------------------------------- the document


def architecture_rows(trained: list[Trained]) -> pd.DataFrame:
    return pd.DataFrame([{"Model": t.label, "Parameters": f"{parameter_count(t.model):,}",
                          "Bottleneck": t.model.code_size()} for t in trained])


# --------------------------------------------------------------------------- the stage


def load_trained(params: Params, models_root: Path, metrics: MetricsDir) -> list[Trained]:
    """Each configuration's first-seed training, as the figures show it."""
    seed = params.train.seeds[0]
    dirs = {name: ModelDir.of(models_root, name, seed) for name in params.models}
    models = {name: load_model(d.best, params.data.image_size)[0] for name, d in dirs.items()}
    labels = unique_labels(models)
    return [Trained(name, models[name], pd.read_csv(d.history), np.load(metrics.reconstructions(name, seed)),
                    labels[name]) for name, d in dirs.items()]


def build_report(params: Params, data_dir: Path, models_root: Path, metrics: MetricsDir, out: Path) -> list[Path]:
    """Write every figure, table and the report into `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    manifest, test, units = read_manifest(data_dir), load_split(data_dir, "test"), read_test_units(data_dir)
    trained = load_trained(params, models_root, metrics)
    labels = {t.name: t.label for t in trained}
    per_image, per_seed = pd.read_csv(metrics.per_image), pd.read_csv(metrics.per_seed)
    summary = pd.read_csv(metrics.summary)
    result = json.loads(metrics.eval_json.read_text(encoding="utf-8"))

    picks = grid_picks(units, params.report.grid_images, params.seed)
    with atomic_path(out / "grid.csv") as tmp:
        pd.DataFrame({"column": np.arange(len(picks)), "test_index": picks,
                      "unit": [units[i] for i in picks]}).to_csv(tmp, index=False)
    save_png(image_grid({"Ground Truth": test[picks], **{t.label: t.recon[picks] for t in trained}},
                        [f"#{i}" for i in picks]), out / "grid.png")
    plot_curves(trained, out / "curves.png")
    generative = [t for t in trained if t.model.generative]
    if generative:
        draw_samples(generative, test, params.report.samples, params.report.interpolation_steps, params.seed, out)
    rated, references = rate_distortion_points(per_seed, trained)
    if len(rated) >= 2:
        plot_rate_distortion(rated, references, out / "rate_distortion.png")
    worst_rows, worst_titles = {}, []
    first_seed = per_image[per_image["seed"] == params.train.seeds[0]]
    for t in trained:
        worst = first_seed[first_seed["model"] == t.name].nsmallest(5, "psnr")
        idx = worst["index"].to_numpy()
        worst_rows[f"{t.label}: truth"] = test[idx]
        worst_rows[f"{t.label}: output"] = t.recon[idx]
        worst_titles.append(f"{t.label}: " + ", ".join(f"#{i} {p:.1f} dB / SSIM {s:.2f}" for i, p, s in
                                                       zip(idx, worst["psnr"], worst["ssim"])) + ".")
    save_png(image_grid(worst_rows), out / "worst.png")

    table, pairs = metric_table(summary, labels), paired_table(summary, labels)
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "differences.csv") as tmp:
        pairs.to_csv(tmp, index=False)
    sections = _sections(params, manifest, trained, (table, pairs), summary, worst_titles, result, rated)
    write_report(out, sections, "AutoEncoder vs Variational AutoEncoder")
    return sorted(p for p in out.iterdir() if p.is_file())


def _training_summary(t: Trained) -> str:
    best = t.best_epoch()
    return (f"{t.label} epoch {int(best['epoch'])} (val loss {best['val_loss']:.5g} {t.model.loss_unit}"
            f"{t.model.best_epoch_words(best.to_dict())})")


def _data_sentence(manifest: dict, units: int) -> str:
    counts = manifest["counts"]
    if manifest["source"] == "builtin":
        source = ("crops of the photographs shipped with scikit-image (" + ", ".join(manifest["photos"]) +
                  "); test crops come from grid cells of the photographs that no training crop touches, and no "
                  f"two test images are within {manifest['test_near_duplicate_psnr_db']:g} dB PSNR of each other. "
                  f"Crops of one cell overlap, so the {counts['test']} test images are {units} independent units "
                  "(cells), and intervals resample cells, not images. Six photographs are a demo set, not a "
                  "benchmark: use your own folder for publishable numbers")
    else:
        source = f"the images in {manifest['path']}, split at random; each test file is its own unit"
    return (f"{counts['train']} training, {counts['val']} validation and {counts['test']} test images of "
            f"{manifest['image_size']}x{manifest['image_size']} RGB: {source}. {manifest['skipped_count']} "
            f"unreadable files skipped. Data sha256 {manifest['sha256'][:16]}.")


def _sections(params, manifest, trained, tables, summary, worst_titles, result, rated) -> list[Section]:
    table, pairs = tables
    seeds, units = params.train.seeds, int(result["test_units"])
    lpips_note = (f"LPIPS is v0.1 with the AlexNet backbone ({result['lpips_backbone']})."
                  if result["lpips_available"] else
                  "LPIPS is n/a: no AlexNet weights were found that passed their check (see README).")
    seed_words = (f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}): each cell is the mean over seeds "
                  "of each seed's mean over the test images, ± the sd between seeds, [the 95% interval]"
                  if len(seeds) > 1 else
                  f"one training seed ({seeds[0]}): each cell is the mean over the test images [95% interval]. "
                  "The interval covers the test set only: how much another seed would move each model is "
                  "unmeasured (train.seeds: [0, 1, 2] measures it)")
    losses = "; ".join(f"{t.label}: {t.model.loss_unit}" for t in trained)
    sections = [
        Section("Data", [_data_sentence(manifest, units)]),
        Section("Models", [
            "All share the study's convolutional encoder (Conv 3-64-128-256, kernel 4, stride 2, BatchNorm, ReLU) "
            "and its mirrored ConvTranspose decoder with a Sigmoid output; they differ in what lies between."],
            table=architecture_rows(trained)),
        Section("Training", [
            f"Adam (lr {params.lr:g}, weight decay {params.weight_decay:g}), batch size {params.batch_size}, "
            f"{params.epochs} epochs, ReduceLROnPlateau on validation loss (factor {params.train.plateau_factor:g}, "
            f"patience {params.train.plateau_patience}), training seeds {', '.join(map(str, seeds))}. "
            f"Losses: {losses}. The best-validation checkpoint of each training is evaluated; the figures show "
            f"seed {seeds[0]}.",
            "Best epoch: " + "; ".join(_training_summary(t) for t in trained) + "."], image="curves.png"),
        Section("Reconstructions", [
            f"{min(params.report.grid_images, manifest['counts']['test'])} test images drawn "
            f"at random (seed {params.seed}), one per independent unit before any unit repeats (their indices "
            "and units are in grid.csv). Models with a Gaussian latent reconstruct from its posterior mean, so "
            "every output is deterministic. Tiles are enlarged with nearest-neighbour, adding no blur."],
            image="grid.png"),
        Section("Metrics on the test set", [
            f"{manifest['counts']['test']} test images in {units} independent units; {seed_words}. Interval "
            f"method: {INTERVAL_METHOD}, {params.eval.bootstrap_samples} resamples. PSNR is computed per image "
            "(data range 1) and then averaged; SSIM uses the Gaussian 11x11, sigma 1.5 window; MSE is per pixel; "
            f"{lpips_note}", *fid_sentences(result), *elbo_sentences(trained, result)], table=table),
        Section("Paired differences", [
            "Each model's score minus another's on the same test image and the same training seed, averaged; "
            "interval as above."], table=pairs),
        Section("Comparison", [*comparison_sentences(summary, {t.name: t.label for t in trained}),
                               *code_size_finding(summary, trained)]),
    ]
    if len(rated) >= 2:
        sections.append(Section("Rate and distortion", [
            "Test KL (the rate, nats per image) against test PSNR and per-pixel MSE of every model with an ELBO; "
            "error bars are the sd over training seeds, dashed lines the models without a rate.",
            *(line + "." for line in beta_steps(rated))], image="rate_distortion.png"))
    generative = [t for t in trained if t.model.generative]
    if generative:
        others = " and ".join(f"the {t.label} ({t.model.code_values():,}-value code)" for t in trained
                              if not t.model.generative)
        names = ", ".join(t.label for t in generative)
        sections += [
            Section(f"Sampling ({names})", [
                "Images decoded from z ~ N(0, I), the same draws for each model." + (
                    f" Their Sample FID and KID, over {result['test_images']} such images, are in the metric "
                    "table." if result["fid_kid"]["computed"] else "") + (
                    f" {others[0].upper()}{others[1:]} cannot do this: nothing in their training ties the code "
                    "to a known distribution, so there is no prior to draw codes from, and points between two "
                    "codes need not decode to images." if others else "")], image="samples.png"),
            Section("Interpolation", [
                f"Two test images (top, at the ends) and each model's decoding of {params.report.interpolation_steps} "
                "evenly spaced points on the line between their latent means: the first and last points are the "
                "two images' own reconstructions."], image="interpolation.png"),
        ]
    sections.append(Section(f"Worst test images (lowest PSNR, seed {seeds[0]})", worst_titles, image="worst.png"))
    return sections
