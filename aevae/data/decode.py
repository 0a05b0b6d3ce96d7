"""Image files to arrays: what `prepare` and `aevae reconstruct` accept, and why a file is refused."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from aevae import AevaeError

# Errors Pillow raises for files that are not (complete, sane) images.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
               Image.DecompressionBombWarning)


class UnusableImage(Exception):
    """A file that is not a usable image; the message is the reason recorded in the manifest."""


def min_side(image_size: int) -> int:
    """Smaller images would be upscaled more than 4x into a blur, so they are skipped."""
    return max(1, image_size // 4)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), transparency over white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img, dtype=np.float64)
        # Pillow's convert("L") clips 16-bit values at 255, which turns most 16-bit images white.
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one file to an (image_size, image_size, 3) uint8 array, center-cropped to a square."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat that as the bomb it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, much faster
                img.load()
                img = to_rgb(ImageOps.exif_transpose(img))
        if min(img.size) < min_side(image_size):
            raise UnusableImage(f"too small: {img.width}x{img.height} px, at least {min_side(image_size)} px "
                                f"per side needed for {image_size}px images")
        img = ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC)
    except _UNREADABLE as err:
        raise UnusableImage(f"{type(err).__name__}: {err}") from None
    return np.asarray(img, dtype=np.uint8)


def list_files(root: Path) -> list[Path]:
    """Every non-hidden regular file under `root`, sorted; symlinked folders are not followed."""
    if not root.exists():
        raise AevaeError(f"data.path '{root}' does not exist: create it and put images in it, "
                         "or set data.source: builtin")
    if not root.is_dir():
        raise AevaeError(f"data.path '{root}' is a file, not a folder: point data.path at the folder "
                         "that holds the images")
    files = []
    for folder, subdirs, names in os.walk(root):  # followlinks=False: a symlink loop cannot trap us
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [Path(folder, n) for n in names if not n.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())
