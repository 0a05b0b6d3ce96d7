"""A trained model from where users keep it: a checkpoint file (best.pt) or a model logged to MLflow."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from aevae.machine.device import pick_device
from aevae.models.checkpoints import load_model, model_from_weights
from aevae.models.contract import Model


def is_mlflow_uri(model: str | Path) -> bool:
    """runs:/<run id>/model, models:/<name>/<version> and other MLflow model URIs, not a file path
    (a scheme of two letters or more: C:/ stays a Windows path)."""
    return re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+:/", str(model)) is not None


def load_any(model: str | Path, device: str) -> tuple[Model, torch.device]:
    """A checkpoint file (best.pt) or a model logged to MLflow, on `device`."""
    if is_mlflow_uri(model):
        from aevae.tracking.model import load_logged_model

        built = model_from_weights(*load_logged_model(str(model)), source=str(model))
    else:
        built, _ = load_model(Path(model))
    target = pick_device(device)
    return built.to(target), target

