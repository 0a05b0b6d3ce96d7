"""What tables, reports and the MLflow runs view show: the test metrics and the params, named once."""

from __future__ import annotations

METRICS = ("psnr", "ssim", "lpips", "mse")  # scored per test image, in table order
STUDY_METRICS = METRICS[:3]  # the study's table; mse is the distortion of the rate-distortion figure
LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "mse": "MSE (per pixel)",
          "fid": "rFID", "kid": "rKID", "sample_fid": "Sample FID", "sample_kid": "Sample KID"}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "mse": False}
# Set-level scores (aevae.fid), one per training: FID/KID of reconstructions and of prior samples.
SET_METRICS = ("fid", "kid", "sample_fid", "sample_kid")
# Per model on the pipeline's parent run (the ELBO where a model has one, FID/KID where computed).
HEADLINE = (*STUDY_METRICS, *SET_METRICS, "neg_elbo_nats")

# Params a comparison shows: shared by every training, then what one training or one study adds.
SHARED_PARAMS = ("lr", "epochs", "batch_size", "train.precision", "data.source")
TRAINING_PARAMS = (*SHARED_PARAMS, "train.seed", "model.kind", "model.beta", "model.latent_dim")
STUDY_PARAMS = (*SHARED_PARAMS, "train.seeds")  # plus each configuration's models.<name>.<key>

# How every interval is computed (aevae.metrics.crossed_bootstrap): short in eval.json, in full in the report.
INTERVAL = "two-way bootstrap over seeds and test units"
INTERVAL_METHOD = ("two-way percentile bootstrap: training seeds and the test set's independent units resampled "
                   "with replacement, independently (Owen 2007, crossed random effects)")


def fmt(value: float | None, metric: str) -> str:
    """A metric as the report prints it: n/a when missing."""
    if value is None or value != value:  # NaN
        return "n/a"
    return {"psnr": f"{value:.2f}", "mse": f"{value:.5f}", "fid": f"{value:.1f}",
            "sample_fid": f"{value:.1f}"}.get(metric, f"{value:.4f}")
