"""The study's models as the report shows them: each configuration's first-seed training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from aevae.config.schema import Params
from aevae.files.model_dir import ModelDir
from aevae.models.checkpoints import load_model
from aevae.models.contract import Model
from aevae.results.metrics_dir import MetricsDir


@dataclass
class Trained:
    """One model configuration of the study, as the report shows it: its first seed's training."""

    name: str  # the configuration's name: its folder and its key in the metric files
    model: Model
    history: pd.DataFrame
    recon: np.ndarray  # uint8 reconstructions of the test split
    label: str

    def best_epoch(self) -> pd.Series:
        return self.history.loc[self.history["val_loss"].idxmin()]


def unique_labels(models: dict[str, Model]) -> dict[str, str]:
    """Each configuration's label; where two configurations share one, their names are added."""
    labels = {name: model.label for name, model in models.items()}
    counts = pd.Series(list(labels.values())).value_counts()
    return {name: label if counts[label] == 1 else f"{label} ({name})" for name, label in labels.items()}


def load_trained(params: Params, models_root: Path, metrics: MetricsDir) -> list[Trained]:
    """Each configuration's first-seed training, as the figures show it."""
    seed = params.train.seeds[0]
    dirs = {name: ModelDir.of(models_root, name, seed) for name in params.models}
    models = {name: load_model(d.best, params.data.image_size)[0] for name, d in dirs.items()}
    labels = unique_labels(models)
    return [Trained(name, models[name], pd.read_csv(d.history), np.load(metrics.reconstructions(name, seed)),
                    labels[name]) for name, d in dirs.items()]
