"""Test-set evaluation: PSNR, SSIM and LPIPS per image, their means and bootstrap intervals.

Conventions (PITFALLS.md #6), stated once here and in the report:
- images are the uint8 reconstructions scaled to [0, 1], so every number can be recomputed from the
  arrays written to metrics/reconstructions/;
- PSNR is computed per image with data_range 1 and then averaged over images (not over the whole set);
- SSIM uses the paper's Gaussian window, 11x11 with sigma 1.5 (Wang et al. 2004), per image, averaged
  over the three channels and over window positions inside the image (border of 5 px left out);
- MSE is per pixel, per image, then averaged (the distortion of the rate-distortion plot);
- the VAE's test ELBO (reconstruction, KL and their sum) is in nats per image, with z drawn once per
  image under the seed;
- LPIPS is version 0.1 with the AlexNet backbone (the metric's standard setting), inputs mapped from
  [0, 1] to [-1, 1]; where the backbone's weights came from is written beside every LPIPS number.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from aevae import tracking
from aevae.data import load_split, read_manifest
from aevae.files import MetricsDir, ModelDir, atomic_path, write_text
from aevae.images import to_uint8, to_unit
from aevae.lpips_model import LPIPSUnavailable, load_lpips
from aevae.models import Model, load_model, pick_device
from aevae.params import Params

log = logging.getLogger(__name__)

STUDY_METRICS = ("psnr", "ssim", "lpips")  # the study's table
METRICS = (*STUDY_METRICS, "mse")  # mse: per-pixel, per image; the distortion of the rate-distortion plot
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "mse": False}
def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    return peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


SSIM_BORDER = 5  # half of the 11-tap Gaussian window


def ssim_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Mean SSIM over the window positions that lie fully inside the image.

    torchmetrics averages its SSIM map over the whole reflect-padded image; the paper's reference code
    (filter2 'valid') and scikit-image leave out a border of half the window. That moves SSIM by up to
    0.03 on noisy images (measured), so we take torchmetrics' map and average it the paper's way.
    """
    _, ssim_map = structural_similarity_index_measure(pred, target, data_range=1.0, gaussian_kernel=True,
                                                      kernel_size=11, sigma=1.5, return_full_image=True)
    b = SSIM_BORDER
    return ssim_map[..., b:-b, b:-b].mean(dim=(1, 2, 3))


def lpips_per_image(model: torch.nn.Module, pred: Tensor, target: Tensor) -> Tensor:
    return model(pred, target, normalize=True).flatten()  # normalize: [0, 1] -> [-1, 1]


@torch.no_grad()
def reconstruct_all(model: torch.nn.Module, images: np.ndarray, batch_size: int,
                    device: torch.device) -> np.ndarray:
    """uint8 reconstructions of uint8 images (the VAE decodes its posterior mean)."""
    model = model.eval().to(device)
    out = np.empty_like(images)
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruct", unit="batch", leave=False,
                      disable=None):
        x = to_unit(images[start: start + batch_size]).to(device)
        out[start: start + batch_size] = to_uint8(model.reconstruct(x))
    return out


@torch.no_grad()
def score_images(pred: np.ndarray, target: np.ndarray, batch_size: int, lpips_model: torch.nn.Module | None,
                 device: torch.device) -> pd.DataFrame:
    """Per-image psnr, ssim, lpips (NaN when no LPIPS model) and per-pixel mse of uint8 image arrays."""
    columns: dict[str, list[Tensor]] = {m: [] for m in METRICS}
    for start in range(0, len(pred), batch_size):
        p = to_unit(pred[start: start + batch_size]).to(device)
        t = to_unit(target[start: start + batch_size]).to(device)
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
    for start in range(0, len(images), batch_size):
        x = to_unit(images[start: start + batch_size]).to(device)
        for name, value in model.loss(x).terms.items():
            sums[name] = sums.get(name, 0.0) + float(value) * len(x)
    return {name: total / len(images) for name, total in sums.items()}


def elbo_terms(terms: dict[str, float]) -> dict[str, float]:
    """Reconstruction, KL and the negative ELBO (their sum, at beta 1), in nats per image, for a model
    whose loss has those two terms; nothing for the others."""
    if not {"recon", "kl"} <= set(terms):
        return {}
    return {"recon_nats": terms["recon"], "kl_nats": terms["kl"], "neg_elbo_nats": terms["recon"] + terms["kl"]}


def mean_interval(values: np.ndarray, samples: int, seed: int) -> dict[str, float]:
    """Mean, std and a 95% percentile-bootstrap interval of the mean."""
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    if np.isnan(values).any() or len(values) < 2:
        nan = math.nan
        return {"mean": float(np.mean(values)) if len(values) else nan, "std": nan, "ci_low": nan, "ci_high": nan}
    ci = bootstrap((values,), np.mean, n_resamples=samples, confidence_level=0.95, method="percentile",
                   rng=np.random.default_rng(seed)).confidence_interval
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
            "ci_low": float(ci.low), "ci_high": float(ci.high)}


def summarize(per_image: pd.DataFrame, samples: int, seed: int) -> pd.DataFrame:
    """One row per (model, metric), plus the paired difference `a-b` for every pair of models (in the
    order they were scored), per metric: each test image scored by both, so the interval is tight."""
    rows = []
    for model, group in per_image.groupby("model", sort=False):
        for metric in METRICS:
            rows.append({"model": model, "metric": metric, **mean_interval(group[metric].to_numpy(), samples, seed)})
    models = list(per_image["model"].unique())
    paired = per_image.pivot(index="index", columns="model", values=list(METRICS))
    for a, b in itertools.combinations(models, 2):
        for metric in METRICS:
            diff = (paired[metric][a] - paired[metric][b]).to_numpy()
            rows.append({"model": f"{a}-{b}", "metric": metric, **mean_interval(diff, samples, seed)})
    return pd.DataFrame(rows)


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def write_results(out: MetricsDir, per_image: pd.DataFrame, summary: pd.DataFrame, lpips_source: str | None,
                  elbo: dict[str, dict[str, float]]) -> dict:
    """eval.json (DVC metrics), per_image.csv and summary.csv; returns eval.json's content."""
    models = list(per_image["model"].unique())
    means = {model: {row.metric: _json_number(row.mean) for row in group.itertuples()}
             for model, group in summary.groupby("model", sort=False) if model in models}
    for model, terms in elbo.items():
        means[model].update({name: _json_number(value) for name, value in terms.items()})
    result = {"test_images": int(per_image.groupby("model").size().max()), **means,
              "lpips_available": lpips_source is not None, "lpips_backbone": lpips_source}
    lpips_note = f"AlexNet weights: {lpips_source}" if lpips_source else "no AlexNet weights: LPIPS missing"
    summary = summary.assign(source=np.where(summary["metric"] == "lpips", lpips_note, ""))
    with atomic_path(out.per_image) as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.6f", na_rep="NaN")
    with atomic_path(out.summary) as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6f", na_rep="NaN")
    write_text(out.eval_json, json.dumps(result, indent=2) + "\n")
    return result


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


def evaluate(params: Params, data_dir: Path, models: list[ModelDir], out: MetricsDir) -> dict:
    """Score each model's best checkpoint on the test split; write `out` and log to the models' runs and
    the pipeline's parent run."""
    device = pick_device(params.train.device)
    test = load_split(data_dir, "test")
    lpips_model, lpips_source = lpips_or_none(device, params.eval.require_lpips)
    frames, elbo = [], {}
    for model_dir in models:
        model = load_model(model_dir.best, params.data.image_size)[0]
        if terms := elbo_terms(test_loss_terms(model, test, params.eval.batch_size, device, params.seed)):
            elbo[model_dir.name] = terms
        recon = reconstruct_all(model, test, params.eval.batch_size, device)
        with atomic_path(out.reconstructions(model_dir.name)) as tmp, open(tmp, "wb") as f:
            np.save(f, recon)
        scores = score_images(recon, test, params.eval.batch_size, lpips_model, device)
        scores.insert(0, "model", model_dir.name)
        scores.insert(1, "index", np.arange(len(test)))
        frames.append(scores)
    per_image = pd.concat(frames, ignore_index=True)
    summary = summarize(per_image, params.eval.bootstrap_samples, params.seed)
    result = write_results(out, per_image, summary, lpips_source, elbo)
    tracking.log_test_results(models, out, summary, elbo, {"lpips_backbone": lpips_source or "missing: no AlexNet weights"},
                              tracking.Pipeline.of(params.flat(), read_manifest(data_dir)["sha256"]),
                              register=params.tracking.register_models)
    return result
