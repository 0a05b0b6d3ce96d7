import math

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from aevae.metrics import (
    psnr_per_image,
    score_images,
    ssim_per_image,
    summarize,
    to_unit,
)
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


def test_summary_has_intervals_and_the_paired_difference():
    rng = np.random.default_rng(0)
    n = 50
    ae = rng.normal(28, 2, n)
    per_image = pd.DataFrame({
        "model": ["ae"] * n + ["vae"] * n, "index": list(range(n)) * 2,
        "psnr": np.concatenate([ae, ae - 8 + rng.normal(0, 0.1, n)]),
        "ssim": rng.uniform(0, 1, 2 * n), "lpips": np.nan, "mse": rng.uniform(0, 0.01, 2 * n),
    })
    summary = summarize(per_image, samples=500, seed=0).set_index(["model", "metric"])
    ae_psnr = summary.loc[("ae", "psnr")]
    assert ae_psnr["ci_low"] < ae_psnr["mean"] < ae_psnr["ci_high"]
    assert ae_psnr["mean"] == pytest.approx(ae.mean())
    diff = summary.loc[("ae-vae", "psnr")]
    # Paired: the per-image differences vary by 0.1 dB only, so the interval is tight around 8.
    assert diff["mean"] == pytest.approx(8, abs=0.1) and diff["ci_high"] - diff["ci_low"] < 0.2
    assert math.isnan(summary.loc[("ae", "lpips"), "mean"])


def test_the_test_elbo_is_recon_plus_kl_at_beta_one_whatever_beta_trained():
    from aevae.models import VAE, AutoEncoder
    from aevae.metrics import elbo_terms, test_loss_terms

    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, size=(10, 32, 32, 3), dtype=np.uint8)
    vae = VAE(32, 4, beta=0.25)
    terms = test_loss_terms(vae, images, batch_size=4, device=torch.device("cpu"), seed=0)
    assert terms == test_loss_terms(vae, images, batch_size=4, device=torch.device("cpu"), seed=0)  # seeded z
    assert terms["loss"] == pytest.approx(terms["recon"] + 0.25 * terms["kl"], rel=1e-5)
    elbo = elbo_terms(terms)
    assert elbo["neg_elbo_nats"] == pytest.approx(terms["recon"] + terms["kl"]) and elbo["kl_nats"] > 0
    assert elbo_terms(test_loss_terms(AutoEncoder(32), images, 4, torch.device("cpu"), 0)) == {}
