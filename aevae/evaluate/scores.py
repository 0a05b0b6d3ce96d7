"""The per-image scores: PSNR, SSIM, LPIPS and MSE of reconstructions, and a model's own loss terms on
the test set (its ELBO, where it has one).

Conventions (docs/pitfalls.md #6), stated once here and in the report:
- images are the uint8 reconstructions scaled to [0, 1], so every number can be recomputed from the
  arrays written to metrics/reconstructions/;
- PSNR is computed per image with data_range 1 and then averaged over images (not over the whole set);
- SSIM uses the paper's Gaussian window, 11x11 with sigma 1.5 (Wang et al. 2004), per image, averaged
  over the three channels and over window positions inside the image (border of 5 px left out);
- MSE is per pixel, per image, then averaged (the distortion of the rate-distortion figure);
- a model's test ELBO (reconstruction, KL and their sum) is in nats per image, z drawn once per image;
- LPIPS is version 0.1 with the AlexNet backbone (the metric's standard setting), inputs mapped from
  [0, 1] to [-1, 1]; where the backbone's weights came from is written beside every LPIPS number;
- a model's score is the mean over its training seeds of each seed's mean over test images;
- FID and KID (aevae.evaluate.fid) are set-level: one value per training, then the mean and sd over seeds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from aevae.data.tensors import batches, to_uint8
from aevae.evaluate.lpips import LPIPSUnavailable, load_lpips
from aevae.models.contract import Model
from aevae.results.names import METRICS

log = logging.getLogger(__name__)

SSIM_BORDER = 5  # half of the 11-tap Gaussian window


def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    from torchmetrics.functional.image import peak_signal_noise_ratio  # imported where used: seconds

    return peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM over the window positions that lie fully inside the image.

    torchmetrics averages its SSIM map over the whole reflect-padded image; the paper's reference code
    (filter2 'valid') and scikit-image leave out a border of half the window, which moves SSIM visibly on
    noisy images; so we take torchmetrics' map and average it the paper's way (tests/test_metrics.py
    compares with scikit-image).
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, ssim_map = structural_similarity_index_measure(pred, target, data_range=1.0, gaussian_kernel=True,
                                                      kernel_size=11, sigma=1.5, return_full_image=True)
    b = SSIM_BORDER
    return ssim_map[..., b:-b, b:-b].mean(dim=(1, 2, 3))


def lpips_per_image(model: torch.nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    return model(pred, target, normalize=True).flatten()  # normalize: [0, 1] -> [-1, 1]


@torch.no_grad()
def reconstruct_all(model: torch.nn.Module, images: np.ndarray, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """uint8 reconstructions of uint8 images (a VAE decodes its posterior mean)."""
    model = model.eval().to(device)
    parts = [to_uint8(model.reconstruct(x)) for x in tqdm(batches(images, batch_size, device), desc="reconstruct",
                                                         unit="batch", leave=False, disable=None)]
    return np.concatenate(parts) if parts else np.empty_like(images)


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Convolutions and matrix products in true fp32 while metrics are computed: on Ampere and later GPUs
    torch lets cuDNN run fp32 convolutions in TF32 (10-bit mantissa), and SSIM's variance, E[x^2] - mu^2,
    loses most of its digits there (SSIM off by up to 0.15 on one image, emulated). Put back after."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = before


@torch.no_grad()
@ieee_fp32()
def score_images(pred: np.ndarray, target: np.ndarray, batch_size: int, lpips_model: torch.nn.Module | None,
                 device: torch.device) -> pd.DataFrame:
    """Per-image psnr, ssim, lpips (NaN when no LPIPS model) and per-pixel mse of uint8 image arrays."""
    columns: dict[str, list[Tensor]] = {m: [] for m in METRICS}
    for p, t in zip(batches(pred, batch_size, device), batches(target, batch_size, device)):
        columns["psnr"].append(psnr_per_image(p, t).cpu())
        columns["ssim"].append(ssim_per_image(p, t).cpu())
        lp = lpips_per_image(lpips_model, p, t).cpu() if lpips_model is not None else torch.full((len(p),), math.nan)
        columns["lpips"].append(lp)
        columns["mse"].append((p - t).pow(2).mean(dim=(1, 2, 3)).cpu())
    return pd.DataFrame({m: torch.cat(v).double().numpy() for m, v in columns.items()})


@torch.no_grad()
def test_loss_terms(model: Model, images: np.ndarray, batch_size: int, device: torch.device,
                    seed: int) -> dict[str, float]:
    """The model's own loss terms averaged over `images` (weighted by image), in eval mode. A VAE draws z
    once per image: seeded, so the estimate is the same in every run."""
    torch.manual_seed(seed)
    model = model.eval().to(device)
    sums: dict[str, float] = {}
    for x in batches(images, batch_size, device):
        for name, value in model.loss(x).terms.items():
            sums[name] = sums.get(name, 0.0) + float(value) * len(x)
    return {name: total / len(images) for name, total in sums.items()}


def lpips_or_none(device: torch.device, required: bool) -> tuple[torch.nn.Module | None, str | None]:
    """The LPIPS model and its backbone's source; (None, None) with a warning when no weights pass their
    check, unless `required` (eval.require_lpips), which makes that an error."""
    try:
        return load_lpips(device)
    except LPIPSUnavailable as err:
        if required:
            raise
        log.warning("%s LPIPS is recorded as missing (NaN in files, n/a in the report); "
                    "set eval.require_lpips: true to make this an error.", err)
        return None, None
