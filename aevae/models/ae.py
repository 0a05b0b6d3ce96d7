"""The deterministic kinds: the study's AE, and the same AE squeezed to a VAE's code size."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from aevae.models.contract import Model, NoSettings
from aevae.models.conv import CHANNELS, DenseCode, conv_decoder, conv_encoder


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


class CodeSizeAE(DenseCode):
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
