"""FID/KID of each training of the study: its reconstructions and, for a generative model, as many seeded
prior samples as there are test images, against the test images' features (aevae.fid). Every feature set
extracted is saved under metrics/inception/, so each distance can be recomputed from files."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from aevae.fid import FidStatus, fid_kid, save_features
from aevae.files import write_text
from aevae.images import to_uint8
from aevae.inception import Inception, InceptionUnavailable, find_inception
from aevae.models import Model

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
