"""Labelled grids of images saved as PNG: the report's grid, samples and worst cases, and `aevae
reconstruct`'s side-by-side pictures; and which test images the grid shows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from aevae.files.atomic import atomic_path

TILE_SCALE = 2  # nearest-neighbour upscaling for display: every pixel stays a crisp 2x2 block
GAP = 4


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


def grid_picks(units: list[str], n_images: int, seed: int) -> np.ndarray:
    """The test images shown in the grid, drawn at random with the seed, one per independent unit before
    any unit shows twice (crops of one region look alike); in index order."""
    order = np.random.default_rng(seed).permutation(len(units))
    seen, first, rest = set(), [], []
    for i in order:
        (rest if units[i] in seen else first).append(i)
        seen.add(units[i])
    return np.sort(np.array((first + rest)[:n_images], dtype=int))
