"""The evaluation stage's output folder: the names of the files in it, for the stages that read it.

The folder comes from dvc.yaml (each stage's cmd); the names of the files inside are set here only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MetricsDir:
    """The evaluation stage's output folder."""

    path: Path

    @property
    def eval_json(self) -> Path:  # DVC metrics: mean test scores per model
        return self.path / "eval.json"

    @property
    def per_image(self) -> Path:
        return self.path / "per_image.csv"

    @property
    def summary(self) -> Path:  # means, intervals and paired differences
        return self.path / "summary.csv"

    @property
    def per_seed(self) -> Path:  # each training's test means, one row per (model, seed)
        return self.path / "per_seed.csv"

    @property
    def latents(self) -> Path:  # per latent dimension of each model with an ELBO: its KL and mean's variance
        return self.path / "latents.csv"

    def reconstructions(self, config: str, seed: int) -> Path:
        return self.path / "reconstructions" / config / f"seed{seed}.npy"

    @property
    def inception_test(self) -> Path:  # the `features` stage's output: the test images' Inception features
        return self.path / "inception" / "test"

    @property
    def inception_models(self) -> Path:  # every training's reconstruction and sample features (evaluate)
        return self.path / "inception" / "models"
