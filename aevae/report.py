"""The study's answers as files: grid.png, the metric table, curves, samples, worst cases, report.md/html."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from aevae.files import atomic_path, write_text
from aevae.metrics import HIGHER_IS_BETTER, METRICS, to_uint8, to_unit
from aevae.models import VAE, parameter_count

LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
NAMES = {"ae": "AE", "vae": "VAE"}
TILE_SCALE = 2  # nearest-neighbour upscaling for display: every pixel stays a crisp 2x2 block
GAP = 4


# --------------------------------------------------------------------------- figures


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def image_grid(rows: dict[str, Sequence[np.ndarray | None]], column_titles: list[str] | None = None,
               scale: int = TILE_SCALE) -> Image.Image:
    """Rows of equally sized uint8 images, a label left of each row, optional titles above columns.

    Rows may differ in length (the widest sets the width); None leaves a cell blank, to align a short
    row with a long one. Upscaled with nearest-neighbour so that no blur is added to what the models
    produced.
    """
    n_cols = max(len(images) for images in rows.values())
    size = next(image for images in rows.values() for image in images if image is not None).shape[1] * scale
    font = _font(max(12, size // 6))
    label_w = max(int(font.getlength(label)) for label in rows) + 2 * GAP
    title_h = (font.size + 2 * GAP) if column_titles else 0
    width = label_w + n_cols * (size + GAP) + GAP
    height = title_h + len(rows) * (size + GAP) + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles or []):
        x = label_w + c * (size + GAP) + size // 2
        draw.text((x, GAP), title, fill="black", font=font, anchor="mt")
    for r, (label, images) in enumerate(rows.items()):
        y = title_h + r * (size + GAP) + GAP
        draw.text((label_w - GAP, y + size // 2), label, fill="black", font=font, anchor="rm")
        for c, image in enumerate(images):
            if image is None:
                continue
            tile = Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + c * (size + GAP), y))
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def plot_curves(histories: dict[str, pd.DataFrame], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, kind, unit in ((axes[0], "ae", "per-pixel MSE"), (axes[1], "vae", "nats per image")):
        h = histories[kind]
        ax.plot(h["epoch"], h["train_loss"], label="train")
        ax.plot(h["epoch"], h["val_loss"], label="validation")
        ax.set(title=f"{NAMES[kind]} loss", xlabel="epoch", ylabel=unit, yscale="log")
        ax.legend()
    h = histories["vae"]
    ax = axes[2]
    ax.plot(h["epoch"], h["val_recon"], label="reconstruction (val)")
    ax.plot(h["epoch"], h["val_kl"], label="KL (val)")
    ax.set(title="VAE loss terms", xlabel="epoch", ylabel="nats per image", yscale="log")
    ax.legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def vae_samples(model: VAE, test: np.ndarray, n_samples: int, steps: int, seed: int) -> dict[str, np.ndarray]:
    """Images decoded from z ~ N(0, I), and a straight line between two test images' posterior means."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    z = torch.randn(n_samples, model.latent_dim, generator=generator)
    samples = to_uint8(model.decode(z))
    a, b = torch.randperm(len(test), generator=generator)[:2].tolist()
    mu = model.encode(to_unit(test[[a, b]]))[0]
    weights = torch.linspace(0, 1, steps).unsqueeze(1)
    line = to_uint8(model.decode((1 - weights) * mu[0] + weights * mu[1]))
    return {"samples": samples, "interpolation": line, "ends": np.stack([test[a], test[b]])}


# --------------------------------------------------------------------------- tables and text


def _fmt(value: float, metric: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def metric_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The study's table (Metric | AE | VAE) with 95% intervals, plus the paired difference."""
    rows = []
    for metric in METRICS:
        row = {"Metric": LABELS[metric]}
        for model, title in (("ae", "AE"), ("vae", "VAE"), ("ae-vae", "AE - VAE (paired)")):
            s = summary[(summary["model"] == model) & (summary["metric"] == metric)].iloc[0]
            row[title] = _fmt(s["mean"], metric)
            row[f"{title} 95% CI"] = (f"[{_fmt(s['ci_low'], metric)}, {_fmt(s['ci_high'], metric)}]"
                                      if not math.isnan(s["ci_low"]) else "n/a")
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_sentences(summary: pd.DataFrame) -> list[str]:
    """One sentence per metric, saying only what the means and the paired interval support."""
    sentences = []
    for metric in METRICS:
        get = lambda model: summary[(summary["model"] == model) & (summary["metric"] == metric)].iloc[0]  # noqa: E731
        ae, vae, diff = get("ae"), get("vae"), get("ae-vae")
        if math.isnan(ae["mean"]) or math.isnan(vae["mean"]):
            sentences.append(f"{LABELS[metric]}: not available for this run.")
            continue
        better_ae = (ae["mean"] > vae["mean"]) == HIGHER_IS_BETTER[metric]
        (winner, win), (loser, lose) = (("AE", ae), ("VAE", vae)) if better_ae else (("VAE", vae), ("AE", ae))
        direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        if diff["ci_low"] > 0 or diff["ci_high"] < 0:
            verdict = "the 95% interval of the paired difference excludes zero, so the gap is not sampling noise"
        else:
            verdict = "the 95% interval of the paired difference includes zero: no reliable difference on this test set"
        sentences.append(f"{LABELS[metric]} ({direction} is better): {winner} {_fmt(win['mean'], metric)} vs "
                         f"{loser} {_fmt(lose['mean'], metric)}; {verdict}.")
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


def architecture_rows(models: dict[str, torch.nn.Module], image_size: int) -> pd.DataFrame:
    feature = f"256 x {image_size // 8} x {image_size // 8}"
    rows = [{"Model": "AE", "Parameters": f"{parameter_count(models['ae']):,}",
             "Bottleneck": f"{feature} = {256 * (image_size // 8) ** 2:,} values (deterministic)"}]
    vae = models["vae"]
    rows.append({"Model": "VAE", "Parameters": f"{parameter_count(vae):,}",
                 "Bottleneck": f"{vae.latent_dim} Gaussian latents (mu and log-variance from the {feature} features)"})
    return pd.DataFrame(rows)


def write_report(folder: Path, sections: list[Section], title: str) -> None:
    write_text(folder / "report.md", to_markdown(title, sections))
    write_text(folder / "report.html", to_html(title, sections, folder))


# --------------------------------------------------------------------------- the stage


def build_report(params, data_dir: Path, models_root: Path, metrics_dir: Path, out: Path) -> list[Path]:
    """Write every figure, table and the report into `out`; returns the files written."""
    from aevae.data import load_split, read_manifest
    from aevae.models import MODEL_KINDS, load_model
    from aevae.train import BEST, HISTORY

    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data_dir)
    test = load_split(data_dir, "test")
    recon = {k: np.load(metrics_dir / "reconstructions" / f"{k}.npy") for k in MODEL_KINDS}
    per_image = pd.read_csv(metrics_dir / "per_image.csv")
    summary = pd.read_csv(metrics_dir / "summary.csv")
    histories = {k: pd.read_csv(models_root / k / HISTORY) for k in MODEL_KINDS}
    models = {k: load_model(models_root / k / BEST, params.data.image_size)[0] for k in MODEL_KINDS}

    rng = np.random.default_rng(params.seed)
    picks = np.sort(rng.choice(len(test), size=min(params.report.grid_images, len(test)), replace=False))
    save_png(image_grid({"Ground Truth": test[picks], "AE": recon["ae"][picks], "VAE": recon["vae"][picks]},
                        [f"#{i}" for i in picks]), out / "grid.png")
    plot_curves(histories, out / "curves.png")
    gen = vae_samples(models["vae"], test, params.report.samples, params.report.interpolation_steps, params.seed)
    per_row = math.ceil(len(gen["samples"]) / 2)
    save_png(image_grid({"z ~ N(0, I)": gen["samples"][:per_row], "": gen["samples"][per_row:]}), out / "samples.png")
    steps = len(gen["interpolation"])
    ends = [gen["ends"][0], *[None] * (steps - 2), gen["ends"][1]]  # above the line's first and last step
    save_png(image_grid({"test images": ends, "decoded line": gen["interpolation"]}), out / "interpolation.png")
    worst_rows, worst_titles = {}, []
    for kind in MODEL_KINDS:
        scores = per_image[per_image["model"] == kind].nsmallest(5, "psnr")
        idx = scores["index"].to_numpy()
        worst_rows[f"{NAMES[kind]}: truth"] = test[idx]
        worst_rows[f"{NAMES[kind]}: output"] = recon[kind][idx]
        worst_titles.append(", ".join(f"#{i} {p:.1f} dB / SSIM {s:.2f}" for i, p, s in
                                      zip(idx, scores["psnr"], scores["ssim"])))
    save_png(image_grid(worst_rows), out / "worst.png")

    table = metric_table(summary)
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_report(out, _sections(params, manifest, models, histories, table, summary, worst_titles),
                 "AutoEncoder vs Variational AutoEncoder")
    return sorted(p for p in out.iterdir() if p.is_file())


def _sections(params, manifest, models, histories, table, summary, worst_titles) -> list[Section]:
    counts = manifest["counts"]
    source = ("crops of the photographs shipped with scikit-image (" + ", ".join(manifest["photos"]) +
              "); test crops come from image regions that no training crop touches, but they may overlap one "
              "another, so the intervals below are optimistic: use your own folder for publishable numbers"
              if manifest["source"] == "builtin" else f"the images in {manifest['path']}")
    lpips_note = ("LPIPS is v0.1 with the AlexNet backbone." if not table["AE"].eq("n/a").iloc[2] else
                  "LPIPS is n/a: AlexNet's ImageNet weights were not available offline (see README).")
    best = {k: histories[k].loc[histories[k]["val_loss"].idxmin()] for k in histories}
    return [
        Section("Data", [
            f"{counts['train']} training, {counts['val']} validation and {counts['test']} test images of "
            f"{manifest['image_size']}x{manifest['image_size']} RGB: {source}. "
            f"{manifest['skipped_count']} unreadable files skipped. Data sha256 {manifest['sha256'][:16]}."]),
        Section("Models", [
            "Both share the study's convolutional encoder (Conv 3-64-128-256, kernel 4, stride 2, BatchNorm, ReLU) "
            "and its mirrored ConvTranspose decoder with a Sigmoid output. The VAE adds linear layers to the mean "
            "and log-variance of its latent and back."], table=architecture_rows(models, manifest["image_size"])),
        Section("Training", [
            f"Adam (lr {params.lr:g}, weight decay {params.weight_decay:g}), batch size {params.batch_size}, "
            f"{params.epochs} epochs, ReduceLROnPlateau on validation loss (factor {params.train.plateau_factor:g}, "
            f"patience {params.train.plateau_patience}), seed {params.seed}. AE loss: per-pixel MSE. VAE loss per "
            f"image in nats: summed squared error + {params.vae.beta:g} x KL"
            + (f", KL weight warmed up over {params.vae.kl_warmup_epochs} epochs" if params.vae.kl_warmup_epochs else "")
            + ". The best-validation checkpoint of each model is evaluated.",
            f"Best epoch: AE {int(best['ae']['epoch'])} (val MSE {best['ae']['val_loss']:.5f}); "
            f"VAE {int(best['vae']['epoch'])} (val loss {best['vae']['val_loss']:.1f} nats, of which KL "
            f"{best['vae']['val_kl']:.1f}; {int(best['vae']['val_active_units'])} of {models['vae'].latent_dim} "
            "latent dimensions active)."], image="curves.png"),
        Section("Reconstructions", [
            f"{min(params.report.grid_images, counts['test'])} test images drawn at random (seed {params.seed}). "
            "The VAE reconstructs from its posterior mean, so its output is deterministic. "
            "Tiles are enlarged with nearest-neighbour, adding no blur."], image="grid.png"),
        Section("Metrics on the test set", [
            f"Mean over {counts['test']} test images with a 95% percentile-bootstrap interval "
            f"({params.eval.bootstrap_samples} resamples); the last columns are the paired per-image difference "
            "AE - VAE. PSNR is computed per image (data range 1) and then averaged; SSIM uses the Gaussian "
            f"11x11, sigma 1.5 window; {lpips_note}"], table=table),
        Section("Comparison", comparison_sentences(summary)),
        Section("Sampling and interpolation (VAE only)", [
            "Images decoded from z ~ N(0, I), and the decoded straight line between two test images' posterior "
            "means. The AE cannot do this: nothing in its training ties its 16,384-value code to a known "
            "distribution, so there is no prior to draw codes from, and points between two codes need not "
            "decode to images."], image="samples.png"),
        Section("Interpolation", [
            f"Two test images (top, at the ends) and the VAE's decoding of {params.report.interpolation_steps} "
            "evenly spaced points on the line between their posterior means (bottom): the first and last points "
            "are the two images' own reconstructions."], image="interpolation.png"),
        Section("Worst test images (lowest PSNR)", [f"{NAMES[k]}: {t}." for k, t in zip(("ae", "vae"), worst_titles)],
                image="worst.png"),
    ]
