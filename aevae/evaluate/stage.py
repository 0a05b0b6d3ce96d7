"""The evaluate stage: every training of the study (each configuration, each seed) scored on the test
split; metric files written, and the scores logged to the training runs and the pipeline's parent run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from aevae.config.schema import Params
from aevae.data.load import load_split, read_manifest, read_test_units
from aevae.evaluate.features import FidStatus
from aevae.evaluate.fid import GenerationScorer
from aevae.evaluate.intervals import per_seed_table, set_level_rows, summarize
from aevae.evaluate.likelihood import likelihood_method, likelihood_of, no_likelihood
from aevae.evaluate.mlflow_log import log_test_results
from aevae.evaluate.outputs import write_results
from aevae.evaluate.params import EvalParams
from aevae.evaluate.scores import lpips_or_none, reconstruct_all, score_images, test_loss_terms
from aevae.files.atomic import atomic_path
from aevae.files.model_dir import ModelDir
from aevae.machine.device import pick_device
from aevae.models.checkpoints import load_model
from aevae.results.metrics_dir import MetricsDir


def evaluate(params: Params, settings: EvalParams, data_dir: Path, models_root: Path, out: MetricsDir) -> dict:
    """Score every training of the study on the test split; write `out` and log to MLflow; returns
    eval.json's content."""
    device = pick_device(params.train.device)
    test, units, val = load_split(data_dir, "test"), read_test_units(data_dir), load_split(data_dir, "val")
    lpips_model, lpips_source = lpips_or_none(device, settings.require_lpips)
    fid = FidStatus.read(out.inception_test)
    scorer = GenerationScorer(fid, out.inception_test / "features.npy", out.inception_models, device, params.seed)
    trainings = [ModelDir.of(models_root, config, seed) for config, seed in params.trainings()]
    frames, extra, latents = [], {}, []
    for training in tqdm(trainings, desc="evaluate", unit="model", disable=None):
        model = load_model(training.best, params.data.image_size)[0]
        key = (training.config, training.seed)
        extra[key] = model.elbo(test_loss_terms(model, test, settings.batch_size, device, params.seed)) or {}
        recon = reconstruct_all(model, test, settings.batch_size, device)
        with atomic_path(out.reconstructions(*key)) as tmp, open(tmp, "wb") as f:
            np.save(f, recon)
        extra[key].update(scorer.score(*key, model, recon))
        scores = score_images(recon, test, settings.batch_size, lpips_model, device)
        likelihood = no_likelihood(len(test))
        if model.has_elbo and settings.iwae_samples:
            likelihood, figures, per_dim = likelihood_of(model, val, test, settings.iwae_samples, settings.iwae_batch,
                                                         settings.batch_size, device, params.seed)
            extra[key].update(figures)
            latents.append(per_dim.assign(model=training.config, seed=training.seed))
        frames.append(_scored(training, pd.concat([scores, likelihood], axis=1), units))
    per_image = pd.concat(frames, ignore_index=True)
    scorer.write_index(extra)
    per_seed = per_seed_table(per_image, extra, settings.bootstrap_samples, params.seed)
    summary = pd.concat([summarize(per_image, units, settings.bootstrap_samples, params.seed),
                         set_level_rows(per_seed)], ignore_index=True)
    latents_table = (pd.concat(latents, ignore_index=True)[["model", "seed", "dim", "dim_kl_nats", "mean_variance"]]
                     if latents else pd.DataFrame(columns=["model", "seed", "dim", "dim_kl_nats", "mean_variance"]))
    result = write_results(out, per_image, per_seed, summary, latents_table, lpips_source, fid,
                           likelihood_method(settings.iwae_samples))
    log_test_results(params, trainings, out, (per_seed, summary), {
        "lpips_backbone": lpips_source or "missing: no AlexNet weights", "inception_weights": fid.tag()},
        read_manifest(data_dir)["sha256"])
    return result


def _scored(training: ModelDir, scores: pd.DataFrame, units: list[str]) -> pd.DataFrame:
    """Per-image scores of one training, with the columns that say whose and which image."""
    scores.insert(0, "model", training.config)
    scores.insert(1, "seed", training.seed)
    scores.insert(2, "index", np.arange(len(scores)))
    scores.insert(3, "unit", units)
    return scores


