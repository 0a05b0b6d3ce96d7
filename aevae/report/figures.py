"""The report's figures: loss curves, and samples and interpolations of the generative models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from aevae.data.tensors import to_uint8, to_unit
from aevae.files.atomic import atomic_path
from aevae.models.contract import Model
from aevae.report.grid import image_grid, save_png
from aevae.report.trained import Trained


def plot_curves(trained: list[Trained], path: Path) -> None:
    """Each model's loss in its own unit, the per-pixel validation MSE of all (comparable), and the
    terms each model plots beside its loss (curve_terms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_terms = [t for t in trained if t.model.curve_terms]
    panels = len(trained) + 1 + len(with_terms)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True, squeeze=False)
    axes = axes[0]
    for ax, t in zip(axes, trained):
        ax.plot(t.history["epoch"], t.history["train_loss"], label="train")
        ax.plot(t.history["epoch"], t.history["val_loss"], label="validation")
        ax.set(title=f"{t.label} loss", xlabel="epoch", ylabel=t.model.loss_unit, yscale="log")
    ax = axes[len(trained)]
    for t in trained:
        ax.plot(t.history["epoch"], t.history["val_mse"], label=t.label)
    ax.set(title="validation MSE (all models)", xlabel="epoch", ylabel="per-pixel MSE", yscale="log")
    for ax, t in zip(axes[len(trained) + 1:], with_terms):
        for term in t.model.curve_terms:
            ax.plot(t.history["epoch"], t.history[f"val_{term}"], label=f"{term} (val)")
        ax.set(title=f"{t.label} loss terms", xlabel="epoch", ylabel=t.model.loss_unit, yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def latent_line(model: Model, ends: np.ndarray, steps: int) -> np.ndarray:
    """The model's decoded line between two uint8 images, `steps` points, ends included (the contract's
    interpolate)."""
    return to_uint8(model.eval().interpolate(to_unit(ends), steps))


@torch.no_grad()
def draw_samples(generative: list[Trained], test: np.ndarray, n_samples: int, steps: int, seed: int,
                 out: Path) -> None:
    """samples.png: images decoded from each generative model's prior (the same draws for each), and
    interpolation.png: each one's decoded line between the latent means of the same two test images."""
    rows, lines = {}, {}
    a, b = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:2].tolist()
    ends = np.stack([test[a], test[b]])
    for k, t in enumerate(generative):
        samples = to_uint8(t.model.eval().sample(n_samples, torch.Generator().manual_seed(seed)))
        per_row = math.ceil(len(samples) / 2)
        # Two rows per model; the second's label is blank (spaces keep the row keys apart).
        rows[f"{t.label}: z ~ N(0, I)"], rows[" " * (k + 1)] = samples[:per_row], samples[per_row:]
        lines[t.label] = latent_line(t.model, ends, steps)
    save_png(image_grid(rows), out / "samples.png")
    save_png(image_grid({"test images": [ends[0], *[None] * (steps - 2), ends[1]], **lines}),
             out / "interpolation.png")
