"""Images as models see them: (N, H, W, 3) uint8 arrays <-> (N, 3, H, W) float tensors in [0, 1], batched."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def to_unit(images: np.ndarray | Tensor) -> Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]: the one place images become model inputs."""
    images = torch.as_tensor(images)
    return images.permute(0, 3, 1, 2).float().div(255)


def batches(images: np.ndarray | Tensor, batch_size: int, device: torch.device,
            generator: torch.Generator | None = None, skip: int = 0) -> Iterator[Tensor]:
    """Float (N, 3, H, W) batches in [0, 1] of (N, H, W, 3) uint8 images, in order or, when a generator is
    given, shuffled (training: a batch of one image is left out, BatchNorm cannot normalise it); the first
    `skip` batches of that order are left out (a pass resumed mid-epoch)."""
    images, n = torch.as_tensor(images), len(images)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(skip * batch_size, n, batch_size):
        idx = order[start: start + batch_size]
        if generator is not None and len(idx) < 2:
            continue
        # channels_last: oneDNN's fastest layout for these convolutions (bench/results.md)
        yield to_unit(images[idx]).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] -> (N, H, W, 3) uint8, rounded."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
