"""A trained model on disk: its weights with the kind and config that rebuild it, written atomically and
read as untrusted input (no pickled code runs)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aevae import AevaeError
from aevae.files.atomic import atomic_path
from aevae.models.contract import Model
from aevae.models.registry import MODELS


def save_model(path: Path, model: Model, **extra: Any) -> None:
    """Weights plus the model's own config, so that `load_model` rebuilds any kind alike; atomic."""
    checkpoint = {"kind": model.kind, "config": model.config, "state_dict": model.state_dict(), **extra}
    # Serialised in memory first: torch's zip writer reports a failed write (disk full) as an opaque
    # RuntimeError, a plain file write reports it as the OSError it is.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_model(path: Path, image_size: int | None = None) -> tuple[Model, dict[str, Any]]:
    """Rebuild a model from `save_model`'s file. weights_only: a checkpoint is untrusted input."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AevaeError(f"checkpoint {path} not found: run the training stages first (dvc repro)") from None
    except Exception as err:  # torch raises many types for a corrupt or malicious file
        raise AevaeError(f"{path} is not a loadable aevae checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}); re-train with dvc repro --force") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") not in MODELS or "config" not in checkpoint:
        raise AevaeError(f"{path} is not an aevae checkpoint (no model kind and config in it); re-train with dvc repro")
    config = checkpoint["config"]
    if image_size is not None and config.get("image_size") != image_size:
        raise AevaeError(f"{path} was trained on {config.get('image_size')}px images but data.image_size is "
                         f"{image_size}; re-train with dvc repro")
    return model_from_weights(checkpoint["kind"], config, checkpoint["state_dict"], str(path)), checkpoint


def model_from_weights(kind: str, config: dict[str, Any], weights: dict[str, Tensor], source: str) -> Model:
    """The model `kind` built from its `config`, with `weights`, in eval mode; `source` names where they
    came from in the error."""
    try:
        model = MODELS[kind](**config)
        model.load_state_dict(weights)
    except (KeyError, RuntimeError, TypeError) as err:
        raise AevaeError(f"{source} does not match the {kind} architecture "
                         f"({str(err).splitlines()[0]}); re-train with dvc repro --force") from None
    return model.eval()
