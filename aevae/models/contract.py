"""What every model kind promises: the only door through which the rest of aevae reaches a model.

A kind is one class, registered by subclassing `Model` with a `kind` (aevae.models.registry imports every
kind). Everything outside aevae/models asks this contract, never a kind's name, its loss terms or its layers:
- `loss(x, epoch=...)`: a `Loss` with the value to minimise and the named terms to log (units in
  `loss_unit`);
- `reconstruct(x)`: a deterministic reconstruction in [0, 1];
- `generative`, `sample(n)` and `interpolate(ends, steps)`: drawing from the prior and the decoded line
  between two images' codes;
- `elbo(terms)`, `neg_elbo_term`, `rate_term`, `elbo_words(values)`: the test ELBO of a model that has one;
- `has_elbo`, `posterior(x)`, `decode(z)`, `trained_sigma()`: a latent-variable model's parts, from which
  evaluation computes its log-likelihood in bits/dim and its posterior-collapse figures (aevae.evaluate.likelihood);
- `param_groups(lr)`: its parameters grouped for the optimizer, with their learning rates;
- `label`, `code_values()`, `code_size()`, `curve_terms`, `best_epoch_words(row)`: what the report says;
- `Settings`: the kind's keys in a params.yaml `models:` entry; `config`: what rebuilds it, in every
  checkpoint (aevae.models.checkpoints).
Adding a kind: docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from aevae import AevaeError


@dataclass
class Loss:
    """One batch's loss: `value` is minimised; `terms` are batch means logged as train_<name> / val_<name>
    (always `loss` and `mse`, the per-pixel MSE that compares models); `codes` are per-image latent means,
    for counting active latent dimensions."""

    value: Tensor
    terms: dict[str, Tensor]
    codes: Tensor | None = None


class NoSettings(BaseModel):
    """A kind's keys in its params.yaml entry (besides `kind`); extra="forbid": a typo is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


MODELS: dict[str, type[Model]] = {}  # kind -> class, filled by subclassing Model


class Model(nn.Module):
    """What every kind shares; a subclass with a `kind` registers itself in MODELS."""

    kind: ClassVar[str]
    loss_unit: ClassVar[str] = "per-pixel MSE"
    generative: ClassVar[bool] = False  # a prior to sample codes from, and a latent space to interpolate in
    curve_terms: ClassVar[tuple[str, ...]] = ()  # loss terms the report plots beside the loss
    # For a model with an ELBO: which of elbo()'s values are the negative ELBO and the rate (the KL of the
    # posterior from the prior), in nats per image. None for a model without one.
    neg_elbo_term: ClassVar[str | None] = None
    rate_term: ClassVar[str | None] = None
    # A latent-variable model p(z) p(x|z) with prior N(0, I), a Gaussian posterior q(z|x) (posterior) and a
    # decoder mean in [0, 1] (decode): evaluation bounds its log-likelihood under a discretised Gaussian decoder.
    has_elbo: ClassVar[bool] = False
    Settings: ClassVar[type[BaseModel]] = NoSettings
    config: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            MODELS[cls.kind] = cls

    @classmethod
    def from_settings(cls, image_size: int, settings: BaseModel) -> Model:
        return cls(image_size, **settings.model_dump())

    @property
    def label(self) -> str:
        raise NotImplementedError

    def code_values(self) -> int:
        """How many numbers the code between encoder and decoder holds."""
        raise NotImplementedError

    def code_size(self) -> str:
        """The code in words, for the report's architecture table."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)

    def loss(self, x: Tensor, *, epoch: int | None = None) -> Loss:
        """The study's loss: per-pixel MSE."""
        mse = F.mse_loss(self.reconstruct(x).float(), x)
        return Loss(mse, {"loss": mse, "mse": mse})

    def schedule(self, epoch: int) -> dict[str, float]:
        """Per-epoch values of the loss's schedule, logged beside the losses."""
        return {}

    def elbo(self, terms: dict[str, float]) -> dict[str, float]:
        """The test ELBO's terms from the mean test loss terms, in nats per image; empty for a model
        without one."""
        return {}

    def elbo_words(self, values: dict[str, float]) -> str:
        """What the report says of the test ELBO (`values`: elbo()'s keys, means over seeds)."""
        return ""

    def best_epoch_words(self, row: dict[str, float]) -> str:
        """What the report adds about the best epoch's validation row (after its loss)."""
        return ""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters()), "lr": lr}]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise AevaeError(f"the {self.label} has no prior to sample from")

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of the Gaussian q(z|x) of a model with an ELBO, (n, latent) each."""
        raise AevaeError(f"the {self.label} has no posterior over a latent")

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean image in [0, 1] for codes z."""
        raise AevaeError(f"the {self.label} has no decoder of latent codes")

    def trained_sigma(self) -> float | None:
        """The sd of the Gaussian decoder, on [0, 1] pixels, that the training loss implied (None: none)."""
        return None

    def interpolate(self, ends: Tensor, steps: int) -> Tensor:
        """The decoded straight line between the codes of two images (`ends`, (2, 3, H, W) in [0, 1]),
        `steps` points, ends included."""
        raise AevaeError(f"the {self.label} has no latent space to interpolate in")


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across images (Burda et al. 2016, sec. 5.2)."""
    return int((mu.var(dim=0) > threshold).sum())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
