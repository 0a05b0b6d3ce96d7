"""A trained model as an MLflow model: logged with torch.export (no pickle), loaded back by URI."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from aevae import AevaeError
from aevae.models.contract import Model
from aevae.tracking.store import open_store, store_error


class Reconstructor(nn.Module):
    """A model as MLflow serves it: images (N, 3, H, W) in [0, 1] -> its deterministic reconstructions."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.model.reconstruct(x)


def log_model(model: Model) -> None:
    """The model as an MLflow model in the active run.

    It is `Reconstructor(model)` exported with torch.export (MLflow's safe "pt2" format: no pickle), with
    a tensor signature (N, 3, H, W) float32 in [0, 1] -> the same shape, and the model's kind and config
    as metadata, from which `load_logged_model` rebuilds the aevae model itself."""
    from importlib.metadata import version

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    size = model.config["image_size"]
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))])
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()  # batch > 1: a dynamic N
    mlflow.pytorch.log_model(
        Reconstructor(model).cpu(), name="model", signature=ModelSignature(inputs=spec, outputs=spec),
        input_example=example, serialization_format="pt2", pip_requirements=[f"torch=={version('torch')}"],
        metadata={"aevae_kind": model.kind, "aevae_config": model.config, "aevae_label": model.label})


def load_logged_model(uri: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, config, weights) of a model `log_model` logged, from any MLflow model URI
    (`runs:/<run id>/model`, `models:/aevae-vae/1`, ...)."""
    import mlflow

    open_store()
    try:
        info = mlflow.models.get_model_info(uri)
        module = mlflow.pytorch.load_model(uri)
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise store_error(err, f"load MLflow model {uri}") from None
    meta = info.metadata or {}
    if "aevae_kind" not in meta:
        raise AevaeError(f"{uri} is not an aevae model (no aevae_kind in its MLflow metadata)")
    weights = {key.removeprefix("model."): value for key, value in module.state_dict().items()}
    return meta["aevae_kind"], meta["aevae_config"], weights
