"""FID and KID (Heusel et al. 2017; Binkowski et al. 2018) of each training of the study: its
reconstructions and, for a generative model, as many seeded prior samples as there are test images,
against the test images' Inception features (aevae.evaluate.features).

The distances are torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), fed the features
extracted here; every feature set is saved under metrics/inception/, so each distance can be recomputed
from files."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from aevae.data.tensors import to_uint8
from aevae.evaluate.features import FidStatus, save_features
from aevae.evaluate.inception import FEATURES, Inception, InceptionUnavailable, find_inception
from aevae.files.atomic import write_text
from aevae.models.contract import Model

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torchmetrics' default; capped at half the smaller set, so that subsets differ


class GivenFeatures(torch.nn.Module):
    """torchmetrics' "custom feature extractor" for features extracted already: the identity."""

    num_features = FEATURES

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(real: np.ndarray, fake: np.ndarray, seed: int) -> dict[str, float]:
    """torchmetrics' FID and KID (mean and sd over its random subsets) between two feature sets; KID's
    subsets are drawn from torch's generator seeded with `seed`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    size = max(2, min(KID_SUBSET_SIZE, len(real) // 2, len(fake) // 2))
    fid = FrechetInceptionDistance(feature=GivenFeatures())
    with warnings.catch_warnings():  # "KID keeps every feature in memory": 2048 floats per image, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=GivenFeatures(), subsets=KID_SUBSETS, subset_size=size)
    for metric in (fid, kid):
        metric.update(torch.from_numpy(real).double(), real=True)
        metric.update(torch.from_numpy(fake).double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's, which KID's subsets draw from (the fork restores it)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


SAMPLE_SEED_OFFSET = 1_000_003  # prior samples' z: params.seed + this, apart from the test ELBO's z


class GenerationScorer:
    """FID/KID of each training against the test features; saves every feature set it extracts."""

    def __init__(self, status: FidStatus, test_features: Path, out: Path, device: torch.device, seed: int):
        self.status, self.out, self.device, self.seed = status, out, device, seed
        out.mkdir(parents=True, exist_ok=True)
        self.inception: Inception | None = None
        if status.computed:
            self.inception = find_inception()
            if self.inception.sha256 != status.sha256:
                raise InceptionUnavailable(f"the test features came from Inception weights {status.sha256[:12]}... "
                                           f"({status.source}), this machine found {self.inception.sha256[:12]}... "
                                           f"({self.inception.source}); FIDs from two extractors do not compare: "
                                           "run dvc repro -f features")
            self.real = np.load(test_features)

    def score(self, config: str, seed: int, model: Model, recon: np.ndarray) -> dict[str, float]:
        """The training's fid, kid, kid_std and, when it can sample, sample_fid, sample_kid, sample_kid_std."""
        if self.inception is None:
            return {}
        recon_features = self.inception.features(recon, self.device, desc=f"inception: {config} seed {seed}")
        save_features(recon_features, self.out / "reconstructions" / config / f"seed{seed}.npy")
        scores = fid_kid(self.real, recon_features, self.seed)
        if model.generative:
            samples = self.samples(model, len(self.real))
            sample_features = self.inception.features(samples, self.device, desc=f"inception: {config} samples")
            save_features(sample_features, self.out / "samples" / config / f"seed{seed}.npy")
            scores.update({f"sample_{k}": v for k, v in fid_kid(self.real, sample_features, self.seed).items()})
        return scores

    @torch.no_grad()
    def samples(self, model: Model, n: int) -> np.ndarray:
        """n uint8 images decoded from seeded prior draws (the same z for every training of a latent size)."""
        generator = torch.Generator().manual_seed(self.seed + SAMPLE_SEED_OFFSET)
        model = model.eval().to(self.device)
        return np.concatenate([to_uint8(model.sample(min(100, n - i), generator)) for i in range(0, n, 100)])

    def write_index(self, scored: dict[tuple[str, int], dict[str, float]]) -> None:
        """metrics/inception/models/index.json: what each saved feature file is, or why there are none."""
        files = {f"{kind}/{config}/seed{seed}.npy": {"model": config, "seed": seed, "images": kind}
                 for (config, seed), scores in scored.items()
                 for kind in ("reconstructions", "samples") if kind == "reconstructions" or "sample_fid" in scores}
        index = {"fid_kid": asdict(self.status), "files": files}
        write_text(self.out / "index.json", json.dumps(index, indent=2) + "\n")
