"""The test log-likelihood of every model with an ELBO, in bits per dimension, and what its posterior uses
(docs/metrics.md, Likelihood).

The data model: pixels are 8-bit, so p(x|z) is a discretised Gaussian over the 256 values of each subpixel
around the decoder's mean, one shared sd sigma for all, the end bins open (x = 0 takes everything below
0.5/255, x = 255 everything above 254.5/255). Its probabilities sum to 1 over the 256 values, so the numbers
are the log-probability of the image's bytes and compare with published bits/dim.

sigma is chosen on the validation split (calibrate_sigma): the training loss implied one (sqrt(beta / 2) for
squared error, far too wide on [0, 1] pixels), and a likelihood under it says more about that convention than
about the model. Bounds on log p(x), per test image, from k draws z_i ~ q(z|x):
- the ELBO, E_q[log p(x, z_i) - log q(z_i|x)], estimated by the mean of the k log-weights;
- the IWAE bound (Burda et al. 2016), log (1/k) sum_i p(x, z_i) / q(z_i|x): below log p(x), rising towards
  it as k grows (tests/test_likelihood.py checks both against quadrature).
Bits/dim is -bound / (D ln 2), D = 3 x H x W. Everything runs in IEEE fp32, batched: at most `batch`
decodes per pass bound the memory.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from aevae.data.tensors import batches
from aevae.evaluate.scores import ieee_fp32
from aevae.models.contract import Model, active_units
from aevae.results.names import LIKELIHOOD_METRICS

HALF_BIN = 0.5 / 255  # half the width of one of the 256 values on [0, 1]
LOG_2PI = math.log(2 * math.pi)
SIGMA_BOUNDS = (1e-4, 2.0)  # the calibration's search range for the shared sd, on [0, 1] pixels
MI_DRAWS = 10  # z per image in the mutual information's estimate
IWAE_SEED_OFFSET = 2_000_003  # the draws of z: params.seed + this, apart from the samples' and the test ELBO's


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, log_sigma: Tensor | float) -> Tensor:
    """log P(x) of each subpixel value x in {0, 1/255, ..., 1} under N(mean, sigma^2) discretised to 256 bins
    of width 1/255 centred on the values, the first and last open to -inf and +inf."""
    return _log_prob_in_bins(bin_edges(x), mean, log_sigma)


def bin_edges(x: Tensor) -> tuple[Tensor, Tensor]:
    """The edges of each value's bin: x -+ 0.5/255, the end bins open (computed once per image batch)."""
    return (torch.where(x < HALF_BIN, -math.inf, x - HALF_BIN), torch.where(x > 1 - HALF_BIN, math.inf, x + HALF_BIN))


def _log_prob_in_bins(edges: tuple[Tensor, Tensor], mean: Tensor, log_sigma: Tensor | float) -> Tensor:
    """log(Phi(b) - Phi(a)) for the standardised edges a < b, computed on the side of the Gaussian where it does
    not cancel: a bin above the mean through the upper tail (1 - Phi), always from log Phi
    (torch.special.log_ndtr, accurate far into the tails), so a pixel 40 sd from the mean still gets a finite
    log-probability."""
    inv = torch.exp(-torch.as_tensor(log_sigma, dtype=mean.dtype, device=mean.device))
    lower, upper = (edges[0] - mean) * inv, (edges[1] - mean) * inv
    above = lower + upper > 0  # the bin's centre is above the mean: use the upper tail, mirrored
    lo, hi = torch.where(above, -upper, lower), torch.where(above, -lower, upper)
    log_hi = torch.special.log_ndtr(hi)
    return log_hi + torch.log(-torch.expm1(torch.special.log_ndtr(lo) - log_hi))


def bits_per_dim(log_p: Tensor | np.ndarray | float, dims: int) -> Tensor | np.ndarray | float:
    """-log p (nats per image) in bits per dimension."""
    return -log_p / (dims * math.log(2))


def _gaussian_log_density(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


@torch.no_grad()
def likelihood_bounds(model: Model, x: Tensor, log_sigmas: Tensor, samples: int, generator: torch.Generator,
                      batch: int = 1000) -> tuple[Tensor, Tensor]:
    """(ELBO, IWAE bound) on log p(x) in nats per image, each (len(log_sigmas), n): one row per decoder sd,
    all from the same k = `samples` draws z_i ~ q(z|x) per image (drawn on the CPU from `generator`, so the
    same on any device), at most `batch` decodes at a time."""
    mu, logvar = (v.float() for v in model.posterior(x))
    n = len(x)
    per_pass = max(1, batch // n)
    log_sigmas = log_sigmas.to(x.device, torch.float32)
    running = torch.full((len(log_sigmas), n), -math.inf, device=x.device)  # logsumexp of the weights so far
    total = torch.zeros(len(log_sigmas), n, device=x.device)
    edges = bin_edges(x)
    for start in range(0, samples, per_pass):
        k = min(per_pass, samples - start)
        eps = torch.randn((k, *mu.shape), generator=generator).to(x.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        log_prior_over_q = (_gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)) -
                            _gaussian_log_density(z, mu, logvar))  # (k, n)
        means = model.decode(z.flatten(0, 1)).float().unflatten(0, (k, n))
        weights = torch.stack([_log_prob_in_bins(edges, means, s).flatten(2).sum(-1) for s in log_sigmas])
        weights = weights + log_prior_over_q
        running = torch.logaddexp(running, torch.logsumexp(weights, dim=1))
        total += weights.sum(dim=1)
    return total / samples, running - math.log(samples)


@torch.no_grad()
@ieee_fp32()
def calibrate_sigma(model: Model, images: np.ndarray, batch_size: int, device: torch.device,
                    generator: torch.Generator) -> float:
    """The one shared decoder sd that maximises the discretised ELBO of `images` (the validation split), z
    drawn once per image. The KL does not depend on sigma, so the search (Brent's, bounded, on log sigma) runs
    on the reconstruction term at the decoded means, which are computed once."""
    from scipy.optimize import minimize_scalar  # imported where used

    model = model.eval().to(device)
    pairs = []
    for x in batches(images, batch_size, device):
        mu, logvar = (v.float() for v in model.posterior(x))
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=generator).to(device)
        pairs.append((x, model.decode(z).float()))

    def negative_log_likelihood(log_sigma: float) -> float:
        return -sum(float(discretized_gaussian_log_prob(x, m, log_sigma).sum(dtype=torch.float64)) for x, m in pairs)

    found = minimize_scalar(negative_log_likelihood, bounds=tuple(math.log(s) for s in SIGMA_BOUNDS),
                            method="bounded", options={"xatol": 1e-4})
    return float(math.exp(found.x))


@torch.no_grad()
@ieee_fp32()
def score_likelihood(model: Model, images: np.ndarray, sigmas: dict[str, float], samples: int, batch: int,
                     device: torch.device, generator: torch.Generator, desc: str = "likelihood") -> pd.DataFrame:
    """Per test image: the IWAE bound (k = `samples`) and the ELBO in bits/dim at each named decoder sd
    (`sigmas`, e.g. {"": calibrated, "_trained": the training's}), columns bpd<name> and bpd_elbo<name>."""
    model = model.eval().to(device)
    log_sigmas = torch.tensor([math.log(s) for s in sigmas.values()])
    dims = int(np.prod(images.shape[1:]))
    elbo, iwae = [], []
    image_batch = max(1, min(100, batch))
    for x in tqdm(batches(images, image_batch, device), desc=desc, unit="batch", leave=False, disable=None,
                  total=math.ceil(len(images) / image_batch)):
        low, high = likelihood_bounds(model, x.contiguous(), log_sigmas, samples, generator, batch)
        elbo.append(low.cpu())
        iwae.append(high.cpu())
    elbo_all, iwae_all = torch.cat(elbo, dim=1).double(), torch.cat(iwae, dim=1).double()
    columns = {}
    for row, name in enumerate(sigmas):
        columns[f"bpd{name}"] = bits_per_dim(iwae_all[row], dims).numpy()
        columns[f"bpd_elbo{name}"] = bits_per_dim(elbo_all[row], dims).numpy()
    return pd.DataFrame(columns)


@torch.no_grad()
@ieee_fp32()
def posterior_use(model: Model, images: np.ndarray, batch_size: int, device: torch.device,
                  generator: torch.Generator) -> tuple[dict[str, float], pd.DataFrame]:
    """How much of its latent a model uses on `images`: active units (Burda et al. 2016), the mutual
    information I(x; z) under the empirical data distribution (Hoffman & Johnson 2016; He et al. 2019's
    estimator over the whole set), and per latent dimension its mean KL from the prior and the variance of
    its posterior mean across images."""
    model = model.eval().to(device)
    parts = [tuple(v.float().cpu() for v in model.posterior(x)) for x in batches(images, batch_size, device)]
    mu, logvar = torch.cat([p[0] for p in parts]).double(), torch.cat([p[1] for p in parts]).double()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)  # per image and dimension, nats
    per_dim = pd.DataFrame({"dim": np.arange(mu.shape[1]), "dim_kl_nats": kl.mean(0).numpy(),
                            "mean_variance": mu.var(0).numpy()})
    figures = {"active_units": float(active_units(mu)), "latent_dim": float(mu.shape[1]),
               "mutual_information_nats": mutual_information(mu, logvar, generator)}
    return figures, per_dim


def mutual_information(mu: Tensor, logvar: Tensor, generator: torch.Generator, draws: int = MI_DRAWS) -> float:
    """I(x; z) under the empirical distribution of the n images: E_x E_q(z|x)[log q(z|x) - log q(z)], q(z) the
    average of the n posteriors (He et al. 2019, calc_mi, over the whole set). Both logs at the same `draws`
    z per image, whose noise mostly cancels; at most log n nats, the entropy of picking one of n images."""
    n = len(mu)
    z = mu + torch.exp(0.5 * logvar) * torch.randn((draws, *mu.shape), generator=generator, dtype=mu.dtype)
    own = _gaussian_log_density(z, mu, logvar)  # (draws, n)
    z = z.transpose(0, 1).flatten(0, 1)  # image-major: (n * draws, latent)
    rows = max(1, 2 ** 22 // mu.numel())  # ~32 MB of float64 per chunk, whatever the test set's size
    log_qz = torch.cat([torch.logsumexp(_gaussian_log_density(z[i:i + rows, None], mu[None], logvar[None]), dim=1)
                        for i in range(0, len(z), rows)]) - math.log(n)
    return float(own.transpose(0, 1).flatten().mean() - log_qz.mean())


def likelihood_of(model: Model, val: np.ndarray, test: np.ndarray, samples: int, batch: int, batch_size: int,
                  device: torch.device, seed: int) -> tuple[pd.DataFrame, dict[str, float], pd.DataFrame]:
    """Everything the evaluation reports of a model with an ELBO: per test image its bits/dim (LIKELIHOOD_METRICS
    of aevae.results.names), the set-level figures (the calibrated and the trained sd, active units, mutual
    information) and the per-dimension table. Seeded: the same draws in every run and for every model."""
    generator = torch.Generator().manual_seed(seed + IWAE_SEED_OFFSET)
    sigma, trained = calibrate_sigma(model, val, batch_size, device, generator), model.trained_sigma()
    sigmas = {"": sigma, **({"_trained": trained} if trained else {})}
    scores = score_likelihood(model, test, sigmas, samples, batch, device, generator)
    per_image = pd.DataFrame({"bpd": scores["bpd"], "bpd_elbo": scores["bpd_elbo"],
                              "bpd_gap": scores["bpd_elbo"] - scores["bpd"],
                              "bpd_trained": scores["bpd_trained"] if trained else math.nan})
    figures, per_dim = posterior_use(model, test, batch_size, device, generator)
    return per_image, {"sigma": sigma, "trained_sigma": trained or math.nan, **figures}, per_dim


def no_likelihood(n: int) -> pd.DataFrame:
    """The likelihood's columns of a model without an ELBO: missing."""
    return pd.DataFrame({name: np.full(n, math.nan) for name in LIKELIHOOD_METRICS})


def likelihood_method(samples: int) -> dict:
    """How the bits/dim were computed, for eval.json and the report."""
    return {"iwae_samples": samples, "decoder": "discretised Gaussian over 256 values per subpixel, end bins open",
            "sigma": "one shared sd per training, maximising the validation ELBO (z drawn once per image)",
            "unit": "bits per dimension, D = 3 x H x W"}
