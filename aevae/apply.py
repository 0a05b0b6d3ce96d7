"""A trained model on one's own images: reconstructions side by side with scores, samples, interpolations."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from aevae import AevaeError
from aevae.checkpoints import load_model, model_from_weights
from aevae.data import UnusableImage, list_files, load_image
from aevae.figures import latent_line
from aevae.files import atomic_path
from aevae.hardware import pick_device
from aevae.images import image_grid, save_png, to_uint8
from aevae.metrics import lpips_or_none, reconstruct_all, score_images
from aevae.models import Model

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


def is_mlflow_uri(model: str | Path) -> bool:
    """runs:/<run id>/model, models:/<name>/<version> and other MLflow model URIs, not a file path
    (a scheme of two letters or more: C:/ stays a Windows path)."""
    return re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:/", str(model)) is not None


def load_trained(model: str | Path, device: str) -> tuple[Model, torch.device]:
    """A checkpoint file (best.pt) or a model logged to MLflow, on `device`."""
    if is_mlflow_uri(model):
        from aevae.mlflow_model import load_logged_model

        built = model_from_weights(*load_logged_model(str(model)), source=str(model))
    else:
        built, _ = load_model(Path(model))
    target = pick_device(device)
    return built.to(target), target


def reconstruct_files(model_ref: str | Path, inputs: list[Path], out: Path, *, device: str = "auto",
                      batch_size: int = 100) -> pd.DataFrame:
    """<out>/<name>.png (input | reconstruction) per image and <out>/scores.csv (PSNR, SSIM, LPIPS, MSE);
    returns the scores. Images are center-cropped and resized to the model's size, as prepare does."""
    model, device_ = load_trained(model_ref, device)
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


@torch.no_grad()
def sample_images(model_ref: str | Path, out: Path, *, n: int, seed: int, between: tuple[Path, Path] | None = None,
                  steps: int = 8) -> None:
    """`n` images decoded from the prior in `out`, and with `between`, the decoded line between two images
    in <out stem>-interpolation.png."""
    model, _ = load_trained(model_ref, "cpu")
    if not model.generative:
        raise AevaeError(f"{model_ref} holds a deterministic {model.label}: it has no prior to sample from; "
                         "use a VAE checkpoint (models/vae/seed0/best.pt)")
    samples = model.eval().sample(n, torch.Generator().manual_seed(seed))
    save_png(image_grid({"z ~ N(0, I)": to_uint8(samples)}), out)
    if between:
        _, ends = load_images(list(between), model.config["image_size"])
        if len(ends) != 2:
            raise AevaeError("--between needs two usable images")
        line = latent_line(model, ends, steps)
        save_png(image_grid({"images": [ends[0], *[None] * (steps - 2), ends[1]], "decoded line": line}),
                 out.with_name(f"{out.stem}-interpolation.png"))
