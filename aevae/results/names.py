"""The study's scores as every reader names them (evaluation, the report, MLflow, `aevae compare`): which
metrics there are, their labels and directions, how they are printed, and how their intervals are made."""

from __future__ import annotations

METRICS = ("psnr", "ssim", "lpips", "mse")  # scored per test image, in table order
STUDY_METRICS = METRICS[:3]  # the study's table; mse is the distortion of the rate-distortion figure
# Scored per test image for every model with an ELBO (aevae.evaluate.likelihood), bits per dimension: the IWAE
# bound and the ELBO at the decoder sd chosen on validation, their gap, and the IWAE bound at the training's sd.
LIKELIHOOD_METRICS = ("bpd", "bpd_elbo", "bpd_gap", "bpd_trained")
PER_IMAGE_METRICS = (*METRICS, *LIKELIHOOD_METRICS)
LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "mse": "MSE (per pixel)",
          "fid": "rFID", "kid": "rKID", "sample_fid": "Sample FID", "sample_kid": "Sample KID",
          "bpd": "Bits/dim (IWAE)", "bpd_elbo": "Bits/dim (ELBO)", "bpd_gap": "ELBO - IWAE (bits/dim)",
          "bpd_trained": "Bits/dim at the training's sd"}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "mse": False, "bpd": False, "bpd_elbo": False,
                    "bpd_gap": False, "bpd_trained": False}
# Set-level scores (aevae.evaluate.fid), one per training: FID/KID of reconstructions and of prior samples.
SET_METRICS = ("fid", "kid", "sample_fid", "sample_kid")
# As eval.json and per_seed.csv hold them: kid_std is KID's sd over its random subsets.
FID_METRICS = ("fid", "kid", "kid_std", "sample_fid", "sample_kid", "sample_kid_std")
# Per model on the pipeline's parent run (and the negative ELBO where a model has one, FID/KID where computed).
HEADLINE = (*STUDY_METRICS, *SET_METRICS, "bpd")

# Params a comparison shows: shared by every training, then what one training or one study adds (each
# training's own model.<key> settings and each study's models.<name>.<key> are added where present).
SHARED_PARAMS = ("lr", "epochs", "batch_size", "train.precision", "data.source")
TRAINING_PARAMS = (*SHARED_PARAMS, "train.seed", "model.kind")
STUDY_PARAMS = (*SHARED_PARAMS, "train.seeds")

# How every interval is computed (aevae.evaluate.intervals): short in eval.json, in full in the report.
INTERVAL = "two-way bootstrap over seeds and test units"
INTERVAL_METHOD = ("two-way percentile bootstrap: training seeds and the test set's independent units resampled "
                   "with replacement, independently (Owen 2007, crossed random effects)")


def fmt(value: float | None, metric: str) -> str:
    """A metric as the report prints it: n/a when missing."""
    if value is None or value != value:  # NaN
        return "n/a"
    if metric.startswith("bpd"):
        return f"{value:.3f}"
    return {"psnr": f"{value:.2f}", "mse": f"{value:.5f}", "fid": f"{value:.1f}",
            "sample_fid": f"{value:.1f}"}.get(metric, f"{value:.4f}")
