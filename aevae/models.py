"""The study's convolutional AutoEncoder and the models built from the same parts, behind one contract.

A model kind is one class here, registered by subclassing `Model` with a `kind`. Everything outside this
file asks the contract, never a kind's name or its loss terms:
- `loss(x, epoch=...)`: a `Loss` with the value to minimise and the named terms to log (units in
  `loss_unit`); `elbo(terms)`: the test ELBO in nats per image, for a model that has one;
- `reconstruct(x)`: a deterministic reconstruction in [0, 1];
- `generative`, `sample(n)` and `latent_mean(x)`: drawing from the prior and the line between two codes;
- `param_groups(lr)`: its parameters grouped for the optimizer, with their learning rates;
- `label`, `code_values()`, `code_size()`, `curve_terms`, `best_epoch_words(row)`: what the report says;
- `Settings`: the kind's keys in a params.yaml `models:` entry; `config`: what rebuilds it, in every
  checkpoint (aevae.checkpoints).
Adding a kind: a subclass here and an entry under `models:` (README, "Adding a model kind").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from aevae import AevaeError
from aevae.params import Params

CHANNELS = 256  # channels of the conv trunk's output; the spatial size is image_size / 8
DENSE_FAN_IN = 1024  # the conv trunk's typical fan-in: the width Adam's lr is tuned for (see param_groups)


def conv_encoder() -> nn.Sequential:
    """The study's encoder: 3x64x64 -> 256x8x8 (k4 s2 p1 convs, BatchNorm after all but the first)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=4, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.Conv2d(128, CHANNELS, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(CHANNELS),
        nn.ReLU(inplace=True),
    )


def conv_decoder() -> nn.Sequential:
    """The study's decoder, the encoder mirrored: 256x8x8 -> 3x64x64 in [0, 1]."""
    return nn.Sequential(
        nn.ConvTranspose2d(CHANNELS, 128, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(128, 64, kernel_size=4, stride=2, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(64, 3, kernel_size=4, stride=2, padding=1),
        nn.Sigmoid(),
    )


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
        """The test ELBO from the mean test loss terms: recon_nats, kl_nats, neg_elbo_nats (nats per
        image, at beta 1); empty for a model without one."""
        return {}

    def best_epoch_words(self, row: dict[str, float]) -> str:
        """What the report adds about the best epoch's validation row (after its loss)."""
        return ""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters()), "lr": lr}]

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise AevaeError(f"the {self.label} has no prior to sample from")

    def latent_mean(self, x: Tensor) -> Tensor:
        raise AevaeError(f"the {self.label} has no latent space to interpolate in")


class AutoEncoder(Model):
    """The study's AE: a deterministic bottleneck of 256 x (image_size/8)^2 values."""

    kind = "ae"

    def __init__(self, image_size: int = 64) -> None:
        super().__init__()
        self.config = {"image_size": image_size}
        self.encoder = conv_encoder()
        self.decoder = conv_decoder()

    @property
    def label(self) -> str:
        return "AE"

    def code_values(self) -> int:
        return CHANNELS * (self.config["image_size"] // 8) ** 2

    def code_size(self) -> str:
        side = self.config["image_size"] // 8
        return f"{CHANNELS} x {side} x {side} = {self.code_values():,} values (deterministic)"

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class _DenseCode(Model):
    """What the VAE and the AE at the VAE's code size share: a dense code of `latent_dim` values between
    the study's conv trunk and its decoder, and the learning rate of their wide dense layers."""

    def _dense_path(self, image_size: int, latent_dim: int) -> int:
        self.feature_shape = (CHANNELS, image_size // 8, image_size // 8)
        self.latent_dim = latent_dim
        self.encoder = conv_encoder()
        self.from_latent = nn.Linear(latent_dim, CHANNELS * (image_size // 8) ** 2)
        self.decoder = conv_decoder()
        return CHANNELS * (image_size // 8) ** 2

    def code_values(self) -> int:
        return self.latent_dim

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.from_latent(z).unflatten(1, self.feature_shape))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam at `lr`, except dense layers wider than the conv trunk, which get lr * 1024 / fan_in.

        The layers into the code are dense over the whole 256x8x8 feature map (fan-in 16384) with no
        normalisation after them. Adam moves every weight by about lr per step, all in the same direction
        early on, so at lr 0.002 the VAE's log-variance jumps by ~15 within a few steps, KL reaches
        1e4-1e12 nats and Adam's second moments never recover (measured). Scaling a dense layer's Adam lr
        by 1/fan_in is the muP rule (Yang et al. 2022); 1024 is the trunk's typical fan-in, so at 64px
        these layers learn at lr/16. The AE at the VAE's code size gets the same rule: the same path.
        """
        wide = {}
        for layer in self.modules():
            if isinstance(layer, nn.Linear) and layer.in_features > DENSE_FAN_IN:
                wide.setdefault(layer.in_features, []).extend(layer.parameters())
        wide_ids = {id(p) for params in wide.values() for p in params}
        rest = [p for p in self.parameters() if id(p) not in wide_ids]
        return [{"params": rest, "lr": lr},
                *({"params": params, "lr": lr * DENSE_FAN_IN / fan_in} for fan_in, params in wide.items())]


class VAE(_DenseCode):
    """The AE's encoder and decoder around a Gaussian latent of `latent_dim` (Kingma & Welling 2014).

    Loss per image, in nats (docs/pitfalls.md #1): reconstruction is the sum of squared errors over all
    pixels (a Gaussian decoder with fixed variance 1/2, up to a constant) and KL is summed over latent
    dimensions, both averaged over the batch; so beta 1 is the true negative ELBO.
    """

    kind = "vae"
    loss_unit = "nats per image"
    generative = True
    curve_terms = ("recon", "kl")

    class Settings(NoSettings):
        latent_dim: int = Field(128, ge=1)
        # Weight of the KL term; 1 is the true ELBO (beta-VAE, Higgins et al. 2017).
        beta: float = Field(1.0, ge=0)
        kl_warmup_epochs: int = Field(0, ge=0)

    def __init__(self, image_size: int = 64, latent_dim: int = 128, beta: float = 1.0,
                 kl_warmup_epochs: int = 0) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "latent_dim": latent_dim, "beta": beta,
                       "kl_warmup_epochs": kl_warmup_epochs}
        features = self._dense_path(image_size, latent_dim)
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)

    @property
    def label(self) -> str:
        beta = self.config["beta"]
        return "VAE" if beta == 1 else f"VAE beta={beta:g}"

    def code_size(self) -> str:
        side = self.config["image_size"] // 8
        return (f"{self.latent_dim} Gaussian latents (mu and log-variance from the {CHANNELS} x {side} x {side} "
                "features)")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x).flatten(1)
        return self.to_mu(h), self.to_logvar(h)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar

    def latent_mean(self, x: Tensor) -> Tensor:
        return self.encode(x)[0]

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: deterministic, the usual choice for reconstruction metrics."""
        return self.decode(self.latent_mean(x))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images decoded from z ~ N(0, I)."""
        z = torch.randn(n, self.latent_dim, generator=generator)  # drawn on the CPU: same z on any device
        return self.decode(z.to(self.to_mu.weight.device))

    def kl_weight(self, epoch: int | None) -> float:
        """beta, ramped up linearly over the first kl_warmup_epochs epochs (Bowman et al. 2016);
        the final beta when no epoch is given (validation, so val_loss is comparable across epochs)."""
        beta, warmup = self.config["beta"], self.config["kl_warmup_epochs"]
        return beta * min(1.0, epoch / warmup) if warmup and epoch is not None else beta

    def loss(self, x: Tensor, *, epoch: int | None = None) -> Loss:
        x_hat, mu, logvar = self(x)
        mu, logvar = mu.float(), logvar.float()  # KL sums many terms: keep it in fp32 under autocast
        recon = reconstruction_error(x_hat.float(), x).mean()
        kl = kl_divergence(mu, logvar).mean()
        loss = recon + self.kl_weight(epoch) * kl
        return Loss(loss, {"loss": loss, "recon": recon, "kl": kl, "mse": recon / x[0].numel()}, codes=mu)

    def schedule(self, epoch: int) -> dict[str, float]:
        return {"kl_weight": self.kl_weight(epoch)}

    def elbo(self, terms: dict[str, float]) -> dict[str, float]:
        # z drawn once per image; beta 1 whatever beta trained, so every VAE's ELBO compares.
        return {"recon_nats": terms["recon"], "kl_nats": terms["kl"], "neg_elbo_nats": terms["recon"] + terms["kl"]}

    def best_epoch_words(self, row: dict[str, float]) -> str:
        words = f", of which KL {row['val_kl']:.1f}" if "val_kl" in row else ""
        if "val_active_units" in row:
            words += f"; {int(row['val_active_units'])} of {self.latent_dim} latent dimensions active"
        return words


class CodeSizeAE(_DenseCode):
    """The study's AE squeezed to a VAE's code size: the same encoder, a linear layer to `latent_dim`
    deterministic values, and the VAE's path back to the decoder, trained on the study's per-pixel MSE.

    The study's AE keeps 16,384 numbers for a 12,288-value image; this one keeps as many as the VAE has
    latents, so the gap between it and the VAE is what the VAE's noise and KL cost, not code size.
    """

    kind = "ae_code"

    class Settings(NoSettings):
        latent_dim: int = Field(128, ge=1)  # set it to the VAE's, for the comparison at equal code size

    def __init__(self, image_size: int = 64, latent_dim: int = 128) -> None:
        super().__init__()
        self.config = {"image_size": image_size, "latent_dim": latent_dim}
        features = self._dense_path(image_size, latent_dim)
        self.to_code = nn.Linear(features, latent_dim)

    @property
    def label(self) -> str:
        return f"AE-{self.latent_dim}"

    def code_size(self) -> str:
        side = self.config["image_size"] // 8
        return f"{self.latent_dim} values (deterministic, a linear map of the {CHANNELS} x {side} x {side} features)"

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.to_code(self.encoder(x).flatten(1)))


def build_model(name: str, params: Params) -> Model:
    """The study's model configuration `name` (params.yaml `models.<name>`), its settings checked."""
    if name not in params.models:
        raise AevaeError(f"no model configuration '{name}' under models: in params.yaml (there are: "
                         f"{', '.join(params.models)})")
    entry = params.models[name]
    if entry.kind not in MODELS:
        raise AevaeError(f"models.{name}.kind: unknown model kind {entry.kind!r}; expected one of {', '.join(MODELS)}")
    cls = MODELS[entry.kind]
    try:
        settings = cls.Settings.model_validate(entry.settings())
    except ValidationError as err:
        problems = [(".".join(map(str, e["loc"])), e) for e in err.errors()]
        raise AevaeError("; ".join(
            f"params.yaml: models.{name}.{key}: " + ("unknown key for kind " + repr(entry.kind) + " (a typo?)"
                                                     if e["type"] == "extra_forbidden" else
                                                     f"{e['msg']} (got {e.get('input')!r})")
            for key, e in problems)) from None
    return cls.from_settings(params.data.image_size, settings)


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, summed over latent dimensions, in nats."""
    # Closed form from Kingma & Welling (2014), appendix B.
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Sum of squared errors per image: the Gaussian decoder's NLL (variance 1/2) up to a constant."""
    return (x_hat - x).pow(2).flatten(1).sum(dim=1)


def active_units(mu: Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies across images (Burda et al. 2016, sec. 5.2)."""
    return int((mu.var(dim=0) > threshold).sum())


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
