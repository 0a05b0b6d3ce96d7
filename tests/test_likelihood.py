"""The likelihood estimators against exact answers (aevae.evaluate.likelihood): the discretised decoder's
probabilities sum to 1, the IWAE bound rises to a log-likelihood computed by quadrature, the calibrated sd finds
the data's, the mutual information spans 0 to log n; and the sigma-VAE's loss is the Gaussian's density."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from aevae.evaluate.likelihood import (
    calibrate_sigma,
    discretized_gaussian_log_prob,
    likelihood_bounds,
    mutual_information,
)
from aevae.models.contract import Model
from aevae.models.registry import MODELS

VALUES = torch.arange(256, dtype=torch.float64) / 255


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("mean", [-0.4, 0.0, 0.37, 1.0, 1.6])
@pytest.mark.parametrize("sigma", [1e-4, 2e-3, 0.05, 0.7, 4.0])
def test_the_discretised_decoder_sums_to_one_over_the_256_values(mean, sigma, dtype, tol):
    log_p = discretized_gaussian_log_prob(VALUES.to(dtype), torch.tensor(mean, dtype=dtype), math.log(sigma))
    assert torch.isfinite(log_p).all()  # even 10,000 sd from the mean: computed in the tail, not as log(0)
    assert float(torch.logsumexp(log_p.double(), 0)) == pytest.approx(0.0, abs=tol)


def test_the_discretised_decoder_is_the_gaussian_mass_of_each_bin():
    """Against scipy's normal CDF: interior bins are Phi(b) - Phi(a) (through the survival function above the
    mean, where 1 - Phi is exact and Phi rounds to 1), the end bins take the open tails."""
    from scipy.stats import norm

    mean, sigma = 0.3, 0.05
    log_p = discretized_gaussian_log_prob(VALUES, torch.tensor(mean, dtype=torch.float64), math.log(sigma)).numpy()
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 255, [np.inf]])
    below = norm.cdf(edges[1:], mean, sigma) - norm.cdf(edges[:-1], mean, sigma)
    above = norm.sf(edges[:-1], mean, sigma) - norm.sf(edges[1:], mean, sigma)
    expected = np.where(VALUES.numpy() > mean, above, below)
    keep = expected > 1e-300
    assert np.allclose(np.exp(log_p[keep]), expected[keep], rtol=1e-9, atol=0)


class TinyLatentModel(Model):
    """A 2-d latent model on 6 subpixels through the contract (no `kind`: not registered): decoder mean
    sigmoid(W z + b), and a posterior that is deliberately not the true one, so the ELBO is loose."""

    has_elbo = True

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(6, 2, generator=g, dtype=torch.float64) * 1.5)
        self.b = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64) * 0.5)
        self.config = {}

    @property
    def label(self) -> str:
        return "tiny"

    def decode(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z.double() @ self.w.T + self.b).reshape(-1, 3, 1, 2)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # A least-squares guess of z from the logits: close to the true posterior's mean, too wide.
        logits = torch.logit(x.reshape(len(x), 6).double().clamp(0.02, 0.98))
        mu = torch.linalg.lstsq(self.w.detach(), (logits - self.b.detach()).T).solution.T * 0.8
        return mu, torch.full_like(mu, math.log(0.3))


SIGMA = 0.1
# Spacing 0.05, several times finer than p(x|z)'s width in z; the integrand is smooth, and a grid of 701 points
# (spacing 0.02) gives the same log p(x) to 1e-12.
GRID = torch.linspace(-7, 7, 281, dtype=torch.float64)


def exact_log_likelihood(model: TinyLatentModel, x: Tensor) -> Tensor:
    """log p(x) = log of the integral of p(x|z) p(z) over the plane, by the midpoint rule on GRID x GRID."""
    z = torch.cartesian_prod(GRID, GRID)
    means = model.decode(z)
    log_prior = -0.5 * z.pow(2).sum(1) - math.log(2 * math.pi)
    log_px = torch.stack([discretized_gaussian_log_prob(xi, means, math.log(SIGMA)).flatten(1).sum(1) for xi in x])
    return torch.logsumexp(log_px + log_prior, dim=1) + 2 * math.log(float(GRID[1] - GRID[0]))


@torch.no_grad()
def test_the_iwae_bound_rises_to_the_exact_log_likelihood_as_k_grows():
    model = TinyLatentModel()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 2, generator=g, dtype=torch.float64)  # 40 images drawn from the model itself
    x = (model.decode(z) + SIGMA * torch.randn(40, 3, 1, 2, generator=g, dtype=torch.float64)).clamp(0, 1)
    x = torch.round(x * 255) / 255
    exact = exact_log_likelihood(model, x)
    assert torch.isfinite(exact).all()
    log_sigma = torch.tensor([math.log(SIGMA)])
    bounds = {k: likelihood_bounds(model, x, log_sigma, k, torch.Generator().manual_seed(1), batch=4000)
              for k in (1, 10, 100, 1000)}
    iwae = {k: float(b[1].mean()) for k, b in bounds.items()}
    elbo = float(bounds[1000][0].mean())  # the ELBO, estimated from 1000 draws
    truth = float(exact.mean())
    # Nats per image, averaged over 40 images. The posterior is off, so the ELBO is well below the truth...
    assert elbo < truth - 0.5, (elbo, truth)
    # ...the IWAE bound climbs with k, from the ELBO's level at k = 1 towards log p(x)...
    assert iwae[1] < iwae[10] < iwae[100] < iwae[1000], iwae
    assert elbo < iwae[10]  # the IWAE bound at k > 1 is tighter than the ELBO (Burda et al. 2016, thm 1)
    # ...and at k = 1000 it is within 0.05 nats per image of the quadrature, having closed 99% of the ELBO's gap
    # of about 6 nats. Measured over draw seeds 1-3: 0.005-0.022 nats off (the bound's remaining bias and its
    # noise); the quadrature's own error is below 1e-9 (finer and wider grids agree).
    assert abs(iwae[1000] - truth) < 0.05, (iwae[1000], truth)
    assert truth - iwae[1000] < 0.01 * (truth - elbo)


@torch.no_grad()
def test_the_calibrated_sd_is_the_one_the_data_was_drawn_with():
    """A decoder that always says the same image: the validation images are that image plus Gaussian noise of
    sd 0.05, rounded to 8 bits; the sd that maximises their discretised likelihood is 0.05 again."""

    class Constant(TinyLatentModel):
        def decode(self, z: Tensor) -> Tensor:
            return torch.full((len(z), 3, 16, 16), 0.4, dtype=torch.float64)

        def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return torch.zeros(len(x), 2, dtype=torch.float64), torch.zeros(len(x), 2, dtype=torch.float64)

    g = torch.Generator().manual_seed(0)
    images = (0.4 + 0.05 * torch.randn(200, 16, 16, 3, generator=g)).clamp(0, 1).mul(255).round().to(torch.uint8)
    sigma = calibrate_sigma(Constant(), images.numpy(), 50, torch.device("cpu"), torch.Generator().manual_seed(1))
    assert sigma == pytest.approx(0.05, rel=0.01)


def test_the_mutual_information_is_zero_for_a_collapsed_posterior_and_log_n_for_a_perfect_one():
    n, dims = 100, 8
    g = torch.Generator().manual_seed(0)
    zeros = torch.zeros(n, dims, dtype=torch.float64)
    collapsed = mutual_information(zeros, zeros, g)
    assert collapsed == pytest.approx(0.0, abs=1e-9)
    apart = torch.randn(n, dims, generator=g, dtype=torch.float64) * 20
    perfect = mutual_information(apart, torch.full((n, dims), -8.0, dtype=torch.float64), g)
    assert perfect == pytest.approx(math.log(n), abs=1e-6)
    # Half the images share one code: I(x; z) = log 2 + (1/2) log (n/2) ... exactly the entropy of the code.
    half = apart.clone()
    half[: n // 2] = 0.0
    shared = mutual_information(half, torch.full((n, dims), -8.0, dtype=torch.float64), g)
    assert shared == pytest.approx(math.log(2) / 2 + 0.5 * math.log(n), abs=1e-6)


def test_the_sigma_vae_loss_is_the_gaussian_density_with_its_learned_sd():
    torch.manual_seed(0)
    model = MODELS["sigma_vae"](32, 8)
    assert model.has_elbo and model.generative and model.trained_sigma() == pytest.approx(1.0, abs=0.01)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        model.log_sigma_scaled.fill_(math.log(0.2) / 20)  # the parameter is log sd / 20
    torch.manual_seed(1)
    loss = model.loss(x)
    torch.manual_seed(1)
    x_hat, mu, logvar = model(x)
    sd = model.trained_sigma()
    assert sd == pytest.approx(0.2, rel=0.02)  # the soft floor at log sd -6 moves it by 1%
    nll = -torch.distributions.Normal(x_hat, sd).log_prob(x).flatten(1).sum(1).mean()
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                           torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert loss.terms["recon"].item() == pytest.approx(nll.item(), rel=1e-4)
    assert loss.value.item() == pytest.approx((nll + kl).item(), rel=1e-4)
    assert float(loss.terms["sigma"]) == pytest.approx(sd, rel=1e-6)


def test_the_sigma_vae_learns_its_sd_towards_the_reconstruction_error():
    """Its optimum is sigma^2 = MSE (Rybkin et al. 2021): from sd 1, Adam at the study's lr takes it most of the
    way within 100 steps on a fixed batch, while a plain VAE's implied sd stays at sqrt(1/2)."""
    torch.manual_seed(0)
    model = MODELS["sigma_vae"](16, 8)
    optimizer = torch.optim.Adam(model.param_groups(0.002))
    x = torch.rand(8, 3, 16, 16)
    for _ in range(100):
        optimizer.zero_grad()
        loss = model.loss(x)
        loss.value.backward()
        optimizer.step()
    rmse = math.sqrt(float(loss.terms["mse"]))
    assert model.trained_sigma() < 0.5 and model.trained_sigma() == pytest.approx(rmse, rel=0.5)
    assert MODELS["vae"](32, 8).trained_sigma() == pytest.approx(math.sqrt(0.5))
