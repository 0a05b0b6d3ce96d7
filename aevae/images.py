"""Images as the project shows them: tensors <-> uint8 arrays, and labelled grids saved as PNG.

Kept apart from the report so that training (which logs grids to MLflow while it runs) does not depend
on the report's code: a change to a table does not re-train a model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from aevae.files import atomic_path

TILE_SCALE = 2  # nearest-neighbour upscaling for display: every pixel stays a crisp 2x2 block
GAP = 4


def to_unit(images: np.ndarray | Tensor) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]: the one place images become model inputs."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float().div(255)


def batches(images: np.ndarray | Tensor, batch_size: int, device: torch.device,
            generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Float (N, 3, H, W) batches in [0, 1] of (N, H, W, 3) uint8 images, in order or, when a generator is
    given, shuffled (training: a batch of one image is left out, BatchNorm cannot normalise it)."""
    images, n = torch.as_tensor(images), len(images)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size]
        if generator is not None and len(idx) < 2:
            continue
        # channels_last: oneDNN's fastest layout for these convolutions (+3-11% per step, bench/run.py)
        yield to_unit(images[idx]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8, rounded."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
