import math

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from aevae.data.tensors import to_unit
from aevae.evaluate.intervals import crossed_bootstrap, per_seed_table, summarize
from aevae.evaluate.lpips import find_alexnet
from aevae.evaluate.scores import psnr_per_image, score_images, ssim_per_image
from tests.conftest import random_photo


@pytest.fixture
def image_pairs():
    """Photo-like uint8 images and degraded copies (noise of several strengths)."""
    rng = np.random.default_rng(1)
    target = np.stack([random_photo(rng, 64, 64) for _ in range(6)])
    noise = rng.normal(0, 1, target.shape) * np.array([2, 5, 10, 20, 40, 60])[:, None, None, None]
    pred = np.clip(target + noise, 0, 255).astype(np.uint8)
    return pred, target


def test_psnr_and_ssim_agree_with_scikit_image(image_pairs):
    pred, target = image_pairs
    p, t = to_unit(pred), to_unit(target)
    ours_psnr, ours_ssim = psnr_per_image(p, t).numpy(), ssim_per_image(p, t).numpy()
    for i in range(len(pred)):
        a, b = pred[i] / 255.0, target[i] / 255.0
        assert ours_psnr[i] == pytest.approx(sk_psnr(b, a, data_range=1.0), abs=1e-3)
        # The SSIM paper's setting: Gaussian window, sigma 1.5, population covariance.
        reference = sk_ssim(b, a, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                            use_sample_covariance=False)
        assert ours_ssim[i] == pytest.approx(reference, abs=1e-3)
    assert np.all(np.diff(ours_psnr) < 0)  # more noise, lower PSNR: the test images really differ


def test_psnr_is_averaged_per_image_not_over_the_set():
    target = torch.zeros(2, 3, 8, 8)
    pred = target.clone()
    pred[0] += 0.1  # MSE 0.01 -> 20 dB
    pred[1] += 0.01  # MSE 1e-4 -> 40 dB
    assert psnr_per_image(pred, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def test_score_images_marks_lpips_missing_as_nan(image_pairs):
    pred, target = image_pairs
    scores = score_images(pred, target, batch_size=4, lpips_model=None, device=torch.device("cpu"))
    assert list(scores.columns) == ["psnr", "ssim", "lpips", "mse"] and len(scores) == 6
    assert scores["psnr"].to_numpy() == pytest.approx(10 * np.log10(1 / scores["mse"].to_numpy()), abs=1e-3)
    assert scores["lpips"].isna().all() and scores["psnr"].notna().all()


class PrecisionSeen(torch.overrides.TorchFunctionMode):
    """Notes, for every convolution and matrix product torch runs while it is on, the name of the op and the
    fp32 precision cuDNN and matmuls are set to at that moment (no op is replaced: it only looks)."""

    OPS = ("conv", "linear", "matmul", "mm", "bmm")

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[tuple[str, str]]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.startswith(self.OPS):
            precision = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
            self.seen.setdefault(name, set()).add(precision)
        return func(*args, **(kwargs or {}))


def test_metrics_are_computed_in_ieee_fp32_not_tf32(image_pairs, offline_torch_home):
    """On an Ampere or later GPU torch lets cuDNN run fp32 convolutions in TF32 by default, and SSIM's
    variance loses its digits there: every metric runs with both switched to IEEE fp32, put back after.
    Guards `ieee_fp32` around all of `score_images`: SSIM's Gaussian filter and LPIPS's AlexNet (the real
    one) are convolutions, and each must run under IEEE, whatever the caller had set (TF32 here)."""
    from aevae.evaluate.lpips import load_lpips

    pred, target = image_pairs
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    lpips_model = load_lpips(backbone=find_alexnet(download=False))[0]
    seen = PrecisionSeen()
    try:
        conv.fp32_precision = matmul.fp32_precision = "tf32"
        with seen:
            scores = score_images(pred, target, batch_size=4, lpips_model=lpips_model, device=torch.device("cpu"))
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")  # the caller's, put back
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
    assert scores["ssim"].notna().all() and scores["lpips"].notna().all()
    assert "conv2d" in seen.seen and seen.seen == {op: {("ieee", "ieee")} for op in seen.seen}, seen.seen
    # SSIM alone (no LPIPS model) convolves too: its own filter ran under IEEE, not only LPIPS's layers.
    ssim_only = PrecisionSeen()
    with ssim_only:
        score_images(pred, target, batch_size=4, lpips_model=None, device=torch.device("cpu"))
    assert ssim_only.seen.get("conv2d") == {("ieee", "ieee")}, ssim_only.seen


def per_image_frame(values: dict[tuple[str, int], np.ndarray], units: list[str]) -> pd.DataFrame:
    """per_image.csv's shape: one row per (model, seed, test image), the same value in every metric column
    but psnr, which holds `values`."""
    rows = []
    for (model, seed), psnr in values.items():
        for i, value in enumerate(psnr):
            rows.append({"model": model, "seed": seed, "index": i, "unit": units[i], "psnr": value,
                         "ssim": 0.5, "lpips": np.nan, "mse": 0.01})
    return pd.DataFrame(rows)


def test_summary_has_intervals_and_the_paired_difference():
    rng = np.random.default_rng(0)
    n = 50
    ae = rng.normal(28, 2, n)
    units = [f"u{i}" for i in range(n)]
    per_image = per_image_frame({("ae", 0): ae, ("vae", 0): ae - 8 + rng.normal(0, 0.1, n)}, units)
    summary = summarize(per_image, units, samples=500, seed=0).set_index(["model", "metric"])
    ae_psnr = summary.loc[("ae", "psnr")]
    assert ae_psnr["ci_low"] < ae_psnr["mean"] < ae_psnr["ci_high"]
    assert ae_psnr["mean"] == pytest.approx(ae.mean()) and math.isnan(ae_psnr["seed_sd"])  # one seed: no spread
    assert (ae_psnr["seeds"], ae_psnr["units"]) == (1, 50)
    diff = summary.loc[("ae-vae", "psnr")]
    # Paired: the per-image differences vary by 0.1 dB only, so the interval is tight around 8.
    assert diff["mean"] == pytest.approx(8, abs=0.1) and diff["ci_high"] - diff["ci_low"] < 0.2
    assert math.isnan(summary.loc[("ae", "lpips"), "mean"])


def test_the_mean_over_seeds_is_the_mean_of_each_seeds_image_mean_and_seeds_widen_the_interval():
    rng = np.random.default_rng(1)
    units = [f"u{i}" for i in range(40)]
    images = rng.normal(0, 1, 40)
    offsets = {0: 0.0, 1: 1.0, 2: -0.5}  # what another training seed moves the whole model by
    values = {("m", s): 20 + images + off for s, off in offsets.items()}
    per_image = per_image_frame(values, units)
    row = summarize(per_image, units, samples=2000, seed=0).set_index("metric").loc["psnr"]
    assert row["mean"] == pytest.approx(np.mean([v.mean() for v in values.values()]))
    assert row["seed_sd"] == pytest.approx(np.std([v.mean() for v in values.values()], ddof=1))
    one_seed = summarize(per_image[per_image["seed"] == 0], units, 2000, 0).set_index("metric").loc["psnr"]
    assert row["ci_high"] - row["ci_low"] > 2 * (one_seed["ci_high"] - one_seed["ci_low"])
    table = per_seed_table(per_image, {}, samples=200, seed=0)
    assert table.set_index("seed")["psnr"].to_dict() == pytest.approx({s: (20 + images + o).mean()
                                                                       for s, o in offsets.items()})


def test_images_of_one_unit_count_once_in_the_interval():
    """40 images in 4 regions whose values move together: resampling images would pretend 40 independent
    draws; resampling the regions gives the wide interval that 4 draws support."""
    rng = np.random.default_rng(2)
    region_effect = rng.normal(0, 3, 4)
    values = np.repeat(region_effect, 10) + rng.normal(0, 0.1, 40)
    by_region = crossed_bootstrap(values[None], np.repeat(["a", "b", "c", "d"], 10), 2000, 0)
    by_image = crossed_bootstrap(values[None], np.arange(40).astype(str), 2000, 0)
    assert by_region["units"] == 4 and by_image["units"] == 40
    assert by_region["mean"] == pytest.approx(by_image["mean"]) == pytest.approx(values.mean())
    assert (by_region["ci_high"] - by_region["ci_low"]) > 2 * (by_image["ci_high"] - by_image["ci_low"])


def test_the_test_elbo_is_recon_plus_kl_at_beta_one_whatever_beta_trained():
    from aevae.evaluate.scores import test_loss_terms
    from aevae.models.ae import AutoEncoder
    from aevae.models.vae import VAE

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    vae = VAE(32, 4, beta=0.25)
    terms = test_loss_terms(vae, images, batch_size=4, device=torch.device("cpu"), seed=0)
    assert terms == test_loss_terms(vae, images, batch_size=4, device=torch.device("cpu"), seed=0)  # seeded z
    assert terms["loss"] == pytest.approx(terms["recon"] + 0.25 * terms["kl"], rel=1e-5)
    elbo = vae.elbo(terms)
    assert elbo["neg_elbo_nats"] == pytest.approx(terms["recon"] + terms["kl"]) and elbo["kl_nats"] > 0
    ae = AutoEncoder(32)
    assert ae.elbo(test_loss_terms(ae, images, 4, torch.device("cpu"), 0)) == {}
