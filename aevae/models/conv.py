"""The study's convolutional encoder and decoder, and the dense code path the compact models share."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from aevae.models.contract import Model

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


class DenseCode(Model):
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
        early on, so at lr 0.002 the VAE's log-variance jumps within a few steps, KL explodes by orders of
        magnitude and Adam's second moments never recover (docs/pitfalls.md). Scaling a dense layer's Adam lr
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
