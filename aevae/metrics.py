"""Test-set evaluation: PSNR, SSIM and LPIPS per image, for every training of the study, and intervals
that cover both the training seeds and the test set's independent units.

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
- FID and KID (aevae.fid) are set-level: one value per training, then the mean and sd over seeds.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from aevae.checkpoints import load_model
from aevae.data import load_split, read_manifest, read_test_units
from aevae.display import INTERVAL, METRICS
from aevae.fid import FID_METRICS, FidStatus
from aevae.files import MetricsDir, ModelDir, atomic_path, write_text
from aevae.generation import GenerationScorer
from aevae.hardware import pick_device
from aevae.images import batches, to_uint8
from aevae.lpips_model import LPIPSUnavailable, load_lpips
from aevae.models import Model
from aevae.params import Params

log = logging.getLogger(__name__)

SSIM_BORDER = 5  # half of the 11-tap Gaussian window

def psnr_per_image(pred: Tensor, target: Tensor) -> Tensor:
    return peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


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
    """uint8 reconstructions of uint8 images (a VAE decodes its posterior mean)."""
    model = model.eval().to(device)
    parts = [to_uint8(model.reconstruct(x)) for x in tqdm(batches(images, batch_size, device), desc="reconstruct",
                                                         unit="batch", leave=False, disable=None)]
    return np.concatenate(parts) if parts else np.empty_like(images)


@torch.no_grad()
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


# --------------------------------------------------------------------------- intervals


def crossed_bootstrap(values: np.ndarray, units: np.ndarray, samples: int, seed: int) -> dict[str, float]:
    """Mean of a (seeds x images) array, its sd over seeds, and a 95% interval that resamples the seeds
    and the independent units (clusters of images) independently, with replacement.

    The mean is the mean over seeds of each seed's image mean. A resample draws seeds and units; its
    statistic is the mean over the drawn seeds of the images in the drawn units. Images of one unit (crops
    of one region of one photograph) are not independent, so resampling images would give intervals
    narrower than the evidence; with one seed the interval covers the test set only."""
    values = np.asarray(values, dtype=float)
    n_seeds = len(values)
    codes, unit_index = np.unique(units, return_inverse=True)
    n_units = len(codes)
    mean = float(values.mean()) if values.size else math.nan
    seed_sd = float(values.mean(axis=1).std(ddof=1)) if n_seeds > 1 else math.nan
    out = {"mean": mean, "seed_sd": seed_sd, "ci_low": math.nan, "ci_high": math.nan,
           "seeds": n_seeds, "units": n_units}
    if np.isnan(values).any() or n_units < 2:
        out["mean"] = mean if not np.isnan(values).any() else math.nan
        return out
    sums = np.stack([np.bincount(unit_index, weights=row, minlength=n_units) for row in values])  # seeds x units
    sizes = np.bincount(unit_index, minlength=n_units).astype(float)
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    for start in range(0, samples, 256):  # blocks keep the weight matrices small for large test sets
        b = min(256, samples - start)
        w_seed = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b).astype(float)
        w_unit = rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=b).astype(float)
        total = np.einsum("bs,su,bu->b", w_seed, sums, w_unit)
        stats[start: start + b] = total / (w_seed.sum(axis=1) * (w_unit @ sizes))
    out["ci_low"], out["ci_high"] = (float(q) for q in np.percentile(stats, [2.5, 97.5]))
    return out


def _grid(frame: pd.DataFrame, metric: str, index: np.ndarray) -> np.ndarray:
    """(seeds x images) values of one model's metric, images in test order."""
    return frame.pivot(index="seed", columns="index", values=metric).reindex(columns=index).to_numpy()


def summarize(per_image: pd.DataFrame, units: list[str], samples: int, seed: int) -> pd.DataFrame:
    """One row per (model, metric), plus the paired difference `a-b` of every pair of models (in the order
    they were scored), per metric, matched by seed and test image."""
    index, units = np.arange(len(units)), np.asarray(units)
    rows = []
    models = list(dict.fromkeys(per_image["model"]))
    frames = {m: per_image[per_image["model"] == m] for m in models}
    for model in models:
        for metric in METRICS:
            rows.append({"model": model, "metric": metric,
                         **crossed_bootstrap(_grid(frames[model], metric, index), units, samples, seed)})
    for a, b in itertools.combinations(models, 2):
        shared = set(frames[a]["seed"]) & set(frames[b]["seed"])  # pairs matched by seed and image
        for metric in METRICS:
            first, second = (_grid(frames[m][frames[m]["seed"].isin(shared)], metric, index) for m in (a, b))
            rows.append({"model": f"{a}-{b}", "metric": metric,
                         **crossed_bootstrap(first - second, units, samples, seed)})
    return pd.DataFrame(rows)


def per_seed_table(per_image: pd.DataFrame, extra: dict[tuple[str, int], dict[str, float]], samples: int,
                   seed: int) -> pd.DataFrame:
    """Each training's test means: one row per (model, seed) with each metric, its 95% interval over the
    test set's units (<metric>_ci_low/high) and its set-level scores (`extra`: the ELBO terms of a model
    that has them, FID and KID when computed)."""
    rows = []
    for (model, training_seed), group in per_image.groupby(["model", "seed"], sort=False):
        row = {"model": model, "seed": training_seed}
        for metric in METRICS:
            stats = crossed_bootstrap(group[metric].to_numpy()[None], group["unit"].to_numpy(), samples, seed)
            row.update({metric: stats["mean"], f"{metric}_ci_low": stats["ci_low"],
                        f"{metric}_ci_high": stats["ci_high"]})
        rows.append({**row, **extra.get((model, training_seed), {})})
    return pd.DataFrame(rows)


def set_level_rows(per_seed: pd.DataFrame) -> pd.DataFrame:
    """summary.csv's rows for the set-level scores (FID, KID): mean and sd over seeds, no bootstrap
    interval (resampling images biases FID)."""
    rows = []
    for model, group in per_seed.groupby("model", sort=False):
        for metric in FID_METRICS:
            if metric in group and group[metric].notna().all():
                values = group[metric].to_numpy()
                rows.append({"model": model, "metric": metric, "mean": float(values.mean()),
                             "seed_sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                             "ci_low": math.nan, "ci_high": math.nan, "seeds": len(values), "units": math.nan})
    return pd.DataFrame(rows)


def _json_number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


def write_results(out: MetricsDir, per_image: pd.DataFrame, per_seed: pd.DataFrame, summary: pd.DataFrame,
                  lpips_source: str | None, fid: FidStatus) -> dict:
    """eval.json (DVC metrics: each model's means over seeds), per_image.csv, per_seed.csv, summary.csv;
    returns eval.json's content."""
    models = list(dict.fromkeys(per_image["model"]))
    result: dict = {"test_images": int(per_image["index"].nunique()), "test_units": int(per_image["unit"].nunique())}
    for model in models:
        rows = summary[summary["model"] == model]
        seeds = per_seed[per_seed["model"] == model]
        entry = {row.metric: _json_number(row.mean) for row in rows.itertuples()}
        entry.update({name: _json_number(seeds[name].mean()) for name in seeds.columns  # ELBO terms, FID, KID
                      if name not in ("model", "seed") and not name.startswith(METRICS) and seeds[name].notna().all()})
        if not fid.computed:
            entry.update({"fid": None, "kid": None})
        entry["seeds"] = [int(s) for s in seeds["seed"]]
        result[model] = entry
    result.update({"interval": INTERVAL, "lpips_available": lpips_source is not None,
                   "lpips_backbone": lpips_source, "fid_kid": asdict(fid)})
    lpips_note = f"AlexNet weights: {lpips_source}" if lpips_source else "no AlexNet weights: LPIPS missing"
    inception_note = f"Inception weights: {fid.source}, sha256 {fid.sha256}" if fid.computed else ""
    summary = summary.assign(source=np.select([summary["metric"] == "lpips", summary["metric"].isin(FID_METRICS)],
                                              [lpips_note, inception_note], ""))
    for frame, path in ((per_image, out.per_image), (per_seed, out.per_seed), (summary, out.summary)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6f", na_rep="NaN")
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


def evaluate(params: Params, data_dir: Path, models_root: Path, out: MetricsDir) -> dict:
    """Score every training of the study (each configuration, each seed) on the test split; write `out`
    and log to the training runs and the pipeline's parent run."""
    from aevae.eval_log import log_test_results

    device = pick_device(params.train.device)
    test, units = load_split(data_dir, "test"), read_test_units(data_dir)
    lpips_model, lpips_source = lpips_or_none(device, params.eval.require_lpips)
    fid = FidStatus.read(out.inception_test)
    scorer = GenerationScorer(fid, out.inception_test / "features.npy", out.inception_models, device, params.seed)
    trainings = [ModelDir.of(models_root, config, seed) for config, seed in params.trainings()]
    frames, extra = [], {}
    for training in tqdm(trainings, desc="evaluate", unit="model", disable=None):
        model = load_model(training.best, params.data.image_size)[0]
        key = (training.config, training.seed)
        extra[key] = model.elbo(test_loss_terms(model, test, params.eval.batch_size, device, params.seed)) or {}
        recon = reconstruct_all(model, test, params.eval.batch_size, device)
        with atomic_path(out.reconstructions(*key)) as tmp, open(tmp, "wb") as f:
            np.save(f, recon)
        extra[key].update(scorer.score(*key, model, recon))
        scores = score_images(recon, test, params.eval.batch_size, lpips_model, device)
        scores.insert(0, "model", training.config)
        scores.insert(1, "seed", training.seed)
        scores.insert(2, "index", np.arange(len(test)))
        scores.insert(3, "unit", units)
        frames.append(scores)
    per_image = pd.concat(frames, ignore_index=True)
    scorer.write_index(extra)
    per_seed = per_seed_table(per_image, extra, params.eval.bootstrap_samples, params.seed)
    summary = pd.concat([summarize(per_image, units, params.eval.bootstrap_samples, params.seed),
                         set_level_rows(per_seed)], ignore_index=True)
    result = write_results(out, per_image, per_seed, summary, lpips_source, fid)
    log_test_results(params, trainings, out, per_seed, summary, lpips_source, fid.tag(),
                     read_manifest(data_dir)["sha256"])
    return result
