"""The study's convolutional AutoEncoder and the VAE built from the same parts."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aevae import AevaeError
from aevae.files import atomic_path

MODEL_KINDS = ("ae", "vae")
CHANNELS = 256  # channels of the conv trunk's output; the spatial size is image_size / 8


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


class AutoEncoder(nn.Module):
    """Deterministic bottleneck of 256 x (image_size/8)^2 values."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = conv_encoder()
        self.decoder = conv_decoder()

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self(x)


class VAE(nn.Module):
    """The AE's encoder and decoder around a Gaussian latent of `latent_dim` (Kingma & Welling 2014)."""

    def __init__(self, image_size: int = 64, latent_dim: int = 128) -> None:
        super().__init__()
        self.feature_shape = (CHANNELS, image_size // 8, image_size // 8)
        features = CHANNELS * (image_size // 8) ** 2
        self.encoder = conv_encoder()
        self.to_mu = nn.Linear(features, latent_dim)
        self.to_logvar = nn.Linear(features, latent_dim)
        self.from_latent = nn.Linear(latent_dim, features)
        self.decoder = conv_decoder()
        self.latent_dim = latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x).flatten(1)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.from_latent(z).unflatten(1, self.feature_shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(reparameterize(mu, logvar)), mu, logvar

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean: deterministic, the usual choice for reconstruction metrics."""
        return self.decode(self.encode(x)[0])


def build_model(kind: str, image_size: int = 64, latent_dim: int = 128) -> AutoEncoder | VAE:
    if kind == "ae":
        return AutoEncoder()
    if kind == "vae":
        return VAE(image_size, latent_dim)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


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


def save_model(path: Path, model: AutoEncoder | VAE, kind: str, image_size: int, **extra: Any) -> None:
    """Weights plus what is needed to rebuild the model; written atomically."""
    checkpoint = {"kind": kind, "image_size": image_size, "latent_dim": getattr(model, "latent_dim", 0),
                  "state_dict": model.state_dict(), **extra}
    # Serialised in memory first: torch's zip writer reports a failed write (disk full) as an opaque
    # RuntimeError, a plain file write reports it as the OSError it is.
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load_model(path: Path, image_size: int | None = None) -> tuple[AutoEncoder | VAE, dict[str, Any]]:
    """Rebuild a model from `save_model`'s file. weights_only: a checkpoint is untrusted input."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AevaeError(f"checkpoint {path} not found: run the training stages first (dvc repro)") from None
    except Exception as err:  # torch raises many types for a corrupt or malicious file
        raise AevaeError(f"{path} is not a loadable aevae checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}); re-train with dvc repro --force") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") not in MODEL_KINDS:
        raise AevaeError(f"{path} is not an aevae checkpoint (no model kind in it); re-train with dvc repro")
    if image_size is not None and checkpoint["image_size"] != image_size:
        raise AevaeError(f"{path} was trained on {checkpoint['image_size']}px images but data.image_size is "
                         f"{image_size}; re-train with dvc repro")
    model = build_model(checkpoint["kind"], checkpoint["image_size"], checkpoint["latent_dim"] or 1)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        raise AevaeError(f"{path} does not match the {checkpoint['kind']} architecture "
                         f"({str(err).splitlines()[0]}); re-train with dvc repro --force") from None
    return model.eval(), checkpoint
