"""FID and KID: of each training's reconstructions, and of each generative model's prior samples, against
the test images (Heusel et al. 2017; Binkowski et al. 2018), from Inception features (aevae.inception).
This module decides, extracts the test set's features and measures distances; aevae.generation scores
each training.

The distances themselves are torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), fed the
features this module extracts and saves, so anyone can recompute them from metrics/inception/. Whether
they are computed is decided once, by the `features` stage that extracts the test images' features (once
per data version); its inception.json says why not, and how to turn them on, when they are not.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aevae import AevaeError
from aevae.data import load_split
from aevae.files import atomic_path, write_text
from aevae.hardware import cpu_isa, pick_device
from aevae.inception import FEATURES, InceptionUnavailable, find_inception
from aevae.params import Params

log = logging.getLogger(__name__)

# Per training: distances of its reconstructions (fid, kid) and, for a generative model, of as many prior
# samples as there are test images (sample_fid, sample_kid); kid_std is KID's sd over its subsets.
FID_METRICS = ("fid", "kid", "kid_std", "sample_fid", "sample_kid", "sample_kid_std")
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default; capped at half the smaller set, so that subsets differ


@dataclass
class FidStatus:
    """What the `features` stage decided and found: written as metrics/inception/test/inception.json,
    copied into eval.json as `fid_kid`."""

    computed: bool
    status: str  # "computed", or "not computed: <why>; <how to turn it on>", or "n/a: <why>"
    device: str
    source: str | None = None
    sha256: str | None = None
    preprocessing: str | None = None
    seconds_per_image: float | None = None
    test_images: int = 0

    @classmethod
    def read(cls, folder: Path) -> FidStatus:
        try:
            return cls(**json.loads((folder / "inception.json").read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise AevaeError(f"{folder / 'inception.json'} not found: run the features stage first "
                             "(dvc repro features)") from None

    def write(self, folder: Path) -> None:
        write_text(folder / "inception.json", json.dumps(asdict(self), indent=2) + "\n")

    def tag(self) -> str:
        """The weights behind the numbers, or why there are none: a tag on every MLflow run."""
        return f"{self.source} (sha256 {self.sha256})" if self.computed else self.status

    def note(self) -> str:
        """One line for the report and the logs."""
        if not self.computed:
            return f"FID and KID: {self.status}."
        return (f"Inception-v3 weights: {self.source}, sha256 {self.sha256[:12]}...; preprocessing: "
                f"{self.preprocessing}.")


def skip_reason(setting: bool | str, device: torch.device) -> str | None:
    """eval.fid: true computes, false does not, auto computes on CUDA only (on a CPU the extractor is the
    slowest part of the pipeline: docs/fid.md)."""
    if setting is False:
        return "eval.fid is false; dvc exp run -S eval.fid=true computes them"
    if setting == "auto" and device.type != "cuda":
        return (f"eval.fid is auto and this run's device is {device.type}, where Inception-v3 is slow; "
                "dvc exp run -S eval.fid=true computes them")
    return None


def _device_words(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_isa()})"


def extract_test_features(params: Params, data_dir: Path, out: Path) -> FidStatus:
    """The `features` stage: the test images' Inception features (out/features.npy) and out/inception.json.
    Not computed: measures the extractor's cost per image on a few test images instead, for the report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.npy").unlink(missing_ok=True)
    test, device = load_split(data_dir, "test"), pick_device(params.train.device)
    skip = skip_reason(params.eval.fid, device)
    try:
        inception = find_inception()
    except InceptionUnavailable as err:
        if params.eval.require_fid:
            raise
        why = f"not computed: {skip}" if skip else "n/a"
        status = FidStatus(False, f"{why}; no Inception weights: {err} (eval.require_fid: true makes this an error)",
                           _device_words(device), test_images=len(test))
        log.warning(status.note())
        status.write(out)
        return status
    if skip:
        cost = inception.seconds_per_image(test, device)
        status = FidStatus(False, f"not computed: {skip} (measured {cost:.2f} s per image here, "
                                  f"{_device_words(device)})", _device_words(device),
                           seconds_per_image=round(cost, 4), test_images=len(test), **inception.describe())
    else:
        start = time.perf_counter()
        features = inception.features(test, device, desc="inception: test images")
        cost = (time.perf_counter() - start) / max(1, len(test))
        save_features(features, out / "features.npy")
        status = FidStatus(True, "computed", _device_words(device), seconds_per_image=round(cost, 4),
                           test_images=len(test), **inception.describe())
    log.info(status.note())
    status.write(out)
    return status


def save_features(features: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, features.astype(np.float32))


class GivenFeatures(torch.nn.Module):
    """torchmetrics' "custom feature extractor" for features extracted already: the identity."""

    num_features = FEATURES

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
    """torchmetrics' FID and KID (mean and sd over its random subsets) between two feature sets; KID's
    subsets are drawn from torch's generator seeded with `seed`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    size = max(2, min(KID_SUBSET_SIZE, len(real) // 2, len(fake) // 2))
    fid = FrechetInceptionDistance(feature=GivenFeatures())
    with warnings.catch_warnings():  # "KID keeps every feature in memory": 2048 floats per image, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=GivenFeatures(), subsets=KID_SUBSETS, subset_size=size)
    for metric in (fid, kid):
        metric.update(torch.from_numpy(real).double(), real=True)
        metric.update(torch.from_numpy(fake).double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
