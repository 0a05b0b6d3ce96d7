"""`aevae sample`: images drawn from a generative model's prior, and the decoded line between two images."""

from __future__ import annotations

from pathlib import Path

import torch

from aevae import AevaeError
from aevae.data.tensors import to_uint8
from aevae.inference.load import load_any
from aevae.inference.reconstruct import load_images
from aevae.report.figures import latent_line
from aevae.report.grid import image_grid, save_png


@torch.no_grad()
def sample_images(model_ref: str | Path, out: Path, *, n: int, seed: int, between: tuple[Path, Path] | None = None,
                  steps: int = 8) -> None:
    """`n` images decoded from the prior in `out`, and with `between`, the decoded line between two images
    in <out stem>-interpolation.png."""
    model, _ = load_any(model_ref, "cpu")
    if not model.generative:
        raise AevaeError(f"{model_ref} holds a deterministic {model.label}: it has no prior to sample from; "
                         "use a generative model's checkpoint (models/vae/seed0/best.pt in the default study)")
    samples = model.eval().sample(n, torch.Generator().manual_seed(seed))
    save_png(image_grid({"z ~ N(0, I)": to_uint8(samples)}), out)
    if between:
        _, ends = load_images(list(between), model.config["image_size"])
        if len(ends) != 2:
            raise AevaeError("--between needs two usable images")
        line = latent_line(model, ends, steps)
        save_png(image_grid({"images": [ends[0], *[None] * (steps - 2), ends[1]], "decoded line": line}),
                 out.with_name(f"{out.stem}-interpolation.png"))

