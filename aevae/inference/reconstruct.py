"""`aevae reconstruct`: a trained model on one's own images, each saved beside its reconstruction, with
PSNR, SSIM, LPIPS and MSE per image."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from aevae import AevaeError
from aevae.data.decode import UnusableImage, list_files, load_image
from aevae.evaluate.scores import lpips_or_none, reconstruct_all, score_images
from aevae.files.atomic import atomic_path
from aevae.inference.load import load_any
from aevae.report.grid import image_grid, save_png

log = logging.getLogger(__name__)


def image_files(inputs: list[Path]) -> list[Path]:
    """The files named, and every file under the folders named (hidden ones left out), in order."""
    files = []
    for path in inputs:
        if path.is_dir():
            files += list_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise AevaeError(f"{path} does not exist: name image files or folders that hold images")
    return files


def load_images(files: list[Path], image_size: int) -> tuple[list[Path], np.ndarray]:
    """The usable files and their (N, size, size, 3) uint8 images, cropped and resized as prepare does;
    each unusable file is skipped with one warning line saying why."""
    used, images = [], []
    for path in files:
        try:
            images.append(load_image(path, image_size))
            used.append(path)
        except UnusableImage as err:
            log.warning("skipped %s: %s", path, err)
    if not images:
        raise AevaeError(f"none of the {len(files)} file(s) is a usable image (JPEG/PNG/WebP/BMP, at least "
                         f"{image_size // 4} px per side): nothing to reconstruct")
    return used, np.stack(images)


def reconstruct_files(model_ref: str | Path, inputs: list[Path], out: Path, *, device: str = "auto",
                      batch_size: int = 100) -> pd.DataFrame:
    """<out>/<name>.png (input | reconstruction) per image and <out>/scores.csv (PSNR, SSIM, LPIPS, MSE);
    returns the scores. Images are center-cropped and resized to the model's size, as prepare does."""
    model, device_ = load_any(model_ref, device)
    files, images = load_images(image_files(inputs), model.config["image_size"])
    recon = reconstruct_all(model, images, batch_size, device_)
    lpips_model, lpips_source = lpips_or_none(device_, required=False)
    scores = score_images(recon, images, batch_size, lpips_model, device_)
    scores.insert(0, "file", [str(f) for f in files])
    scores["lpips_backbone"] = lpips_source or "missing"
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(files)
    for name, image, rec in zip(names, images, recon):
        save_png(image_grid({"": [image, rec]}, ["input", model.label]), out / f"{name}.png")
    scores.insert(1, "png", [f"{name}.png" for name in names])
    with atomic_path(out / "scores.csv") as tmp:
        scores.to_csv(tmp, index=False, float_format="%.6f", na_rep="NaN")
    return scores


def _unique_names(files: list[Path]) -> list[str]:
    """File stems, numbered where two files share one (a/x.jpg and b/x.png)."""
    seen: dict[str, int] = {}
    names = []
    for path in files:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}-{count}")
    return names

