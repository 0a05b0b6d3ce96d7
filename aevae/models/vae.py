"""The VAE: the AE's encoder and decoder around a Gaussian latent (Kingma & Welling 2014)."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor, nn

from aevae.models.contract import Loss, NoSettings
from aevae.models.conv import CHANNELS, DenseCode


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, summed over latent dimensions, in nats."""
    # Closed form from Kingma & Welling (2014), appendix B.
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)


def reconstruction_error(x_hat: Tensor, x: Tensor) -> Tensor:
    """Sum of squared errors per image: the Gaussian decoder's NLL (variance 1/2) up to a constant."""
    return (x_hat - x).pow(2).flatten(1).sum(dim=1)


class VAE(DenseCode):
    """The AE's encoder and decoder around a Gaussian latent of `latent_dim` (Kingma & Welling 2014).

    Loss per image, in nats (docs/pitfalls.md #1): reconstruction is the sum of squared errors over all
    pixels (a Gaussian decoder with fixed variance 1/2, up to a constant) and KL is summed over latent
    dimensions, both averaged over the batch; so beta 1 is the true negative ELBO.
    """

    kind = "vae"
    loss_unit = "nats per image"
    generative = True
    curve_terms = ("recon", "kl")
    neg_elbo_term = "neg_elbo_nats"
    rate_term = "kl_nats"
    has_elbo = True

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

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode(x)

    def trained_sigma(self) -> float | None:
        """sqrt(beta / 2): squared error + beta KL is, divided by beta, the negative ELBO of a Gaussian decoder
        with variance beta / 2 (up to a constant); beta 0 implies no finite sd."""
        beta = self.config["beta"]
        return math.sqrt(beta / 2) if beta > 0 else None

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

    def interpolate(self, ends: Tensor, steps: int) -> Tensor:
        """The decoded line between the two images' posterior means."""
        mu = self.latent_mean(ends)
        weights = torch.linspace(0, 1, steps, device=mu.device)[:, None]
        return self.decode(mu[0] * (1 - weights) + mu[1] * weights)

    def kl_weight(self, epoch: int | None) -> float:
        """beta, ramped up linearly over the first kl_warmup_epochs epochs (Bowman et al. 2016);
        the final beta when no epoch is given (validation, so val_loss is comparable across epochs)."""
        beta, warmup = self.config["beta"], self.config["kl_warmup_epochs"]
        return beta * min(1.0, epoch / warmup) if warmup and epoch is not None else beta

    def loss(self, x: Tensor, *, epoch: int | None = None) -> Loss:
        x_hat, mu, logvar = self(x)
        mu, logvar = mu.float(), logvar.float()  # KL sums many terms: keep it in fp32 under autocast
        sse = reconstruction_error(x_hat.float(), x)
        recon = self.reconstruction_nll(sse, x[0].numel()).mean()
        kl = kl_divergence(mu, logvar).mean()
        loss = recon + self.kl_weight(epoch) * kl
        return Loss(loss, {"loss": loss, "recon": recon, "kl": kl, "mse": sse.mean() / x[0].numel(),
                           **self.decoder_terms()}, codes=mu)

    def reconstruction_nll(self, sse: Tensor, pixels: int) -> Tensor:
        """The reconstruction term per image from its sum of squared errors over `pixels` values."""
        return sse

    def decoder_terms(self) -> dict[str, Tensor]:
        """The decoder's own values logged beside the loss terms."""
        return {}

    def schedule(self, epoch: int) -> dict[str, float]:
        return {"kl_weight": self.kl_weight(epoch)}

    def elbo(self, terms: dict[str, float]) -> dict[str, float]:
        # z drawn once per image; beta 1 whatever beta trained, so every VAE's ELBO compares.
        return {"recon_nats": terms["recon"], "kl_nats": terms["kl"], "neg_elbo_nats": terms["recon"] + terms["kl"]}

    def elbo_words(self, values: dict[str, float]) -> str:
        return (f"reconstruction {values['recon_nats']:.1f} + KL {values['kl_nats']:.1f} = "
                f"{values['neg_elbo_nats']:.1f} nats per image (the negative ELBO at beta 1, whatever beta it was "
                "trained with; z drawn once per image)")

    def best_epoch_words(self, row: dict[str, float]) -> str:
        words = f", of which KL {row['val_kl']:.1f}" if "val_kl" in row else ""
        if "val_active_units" in row:
            words += f"; {int(row['val_active_units'])} of {self.latent_dim} latent dimensions active"
        return words
