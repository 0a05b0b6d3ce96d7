"""The calibrated-decoder VAE (sigma-VAE, Rybkin et al., ICML 2021): the VAE whose Gaussian decoder learns
its one shared sd with the network, instead of the fixed variance 1/2 that squared error implies."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from aevae.models.vae import VAE

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
MIN_LOG_SIGMA = -6.0  # Rybkin et al.'s floor: sd e^-6 = 0.0025 on [0, 1], below one grey level (1/255)
# Adam moves a parameter by about lr per step whatever its gradient's scale. The shared log sd starts at 0
# (sd 1, as Rybkin et al.) and must travel to log sqrt(MSE), about -2.5, within the study's few hundred
# steps: at lr 0.002 it would cover 0.5 in 250 steps and stay near sd 0.6, a plain VAE at beta 0.7. So the
# parameter is log sd / 20: Adam's step at the shared lr moves log sd 20 times as far (docs/models.md), and
# every parameter still learns at the optimizer's lr.
LOG_SIGMA_SCALE = 20.0


class SigmaVAE(VAE):
    """The VAE with a Gaussian decoder N(x_hat, sigma^2 I) whose shared log sigma is learned (Rybkin et al.
    2021). Its reconstruction term is the decoder's negative log density per image in nats,
    SSE / (2 sigma^2) + D log sigma + D/2 log 2 pi on [0, 1] pixels, so its loss at beta 1 is the true
    negative ELBO of a continuous density. sigma^2 settles near the mean squared error, the optimum; the
    weight of the KL then follows the reconstruction error instead of a hand-set beta."""

    kind = "sigma_vae"
    curve_terms = ("recon", "kl", "sigma")

    def __init__(self, image_size: int = 64, latent_dim: int = 128, beta: float = 1.0,
                 kl_warmup_epochs: int = 0) -> None:
        super().__init__(image_size, latent_dim, beta, kl_warmup_epochs)
        self.log_sigma_scaled = nn.Parameter(torch.zeros(()))  # log sd / LOG_SIGMA_SCALE

    @property
    def label(self) -> str:
        beta = self.config["beta"]
        return "sigma-VAE" if beta == 1 else f"sigma-VAE beta={beta:g}"

    def code_size(self) -> str:
        return super().code_size() + "; decoder sd learned"

    def clipped_log_sigma(self) -> Tensor:
        """log sigma, softly floored at MIN_LOG_SIGMA (Rybkin et al.'s softclip), so that it cannot run off
        to -inf on a batch the decoder fits exactly."""
        log_sigma = LOG_SIGMA_SCALE * self.log_sigma_scaled.float()
        return MIN_LOG_SIGMA + nn.functional.softplus(log_sigma - MIN_LOG_SIGMA)

    def reconstruction_nll(self, sse: Tensor, pixels: int) -> Tensor:
        log_sigma = self.clipped_log_sigma()
        return sse / (2 * torch.exp(2 * log_sigma)) + pixels * (log_sigma + HALF_LOG_2PI)

    def decoder_terms(self) -> dict[str, Tensor]:
        return {"sigma": self.clipped_log_sigma().exp().detach()}

    def trained_sigma(self) -> float | None:
        return float(self.clipped_log_sigma().detach().exp())

    def elbo_words(self, values: dict[str, float]) -> str:
        return (f"reconstruction {values['recon_nats']:.1f} + KL {values['kl_nats']:.1f} = "
                f"{values['neg_elbo_nats']:.1f} nats per image (the negative ELBO at beta 1 under its learned "
                "Gaussian decoder, a continuous density on [0, 1] pixels, so it can be negative; z drawn once per "
                "image)")

    def best_epoch_words(self, row: dict[str, float]) -> str:
        words = super().best_epoch_words(row)
        return words + (f"; decoder sd {row['val_sigma']:.4f}" if "val_sigma" in row else "")
