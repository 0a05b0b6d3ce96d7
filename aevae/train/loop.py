"""One pass over a split: the batches, the model's loss, the optimizer step; the same for every kind."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aevae.data.tensors import batches
from aevae.models.contract import Model, active_units


def make_optimizer(model: Model, *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam over the model's own parameter groups (each model says which of its layers need another lr)."""
    return torch.optim.Adam(model.param_groups(lr), lr=lr, weight_decay=weight_decay)


def run_epoch(model: Model, images: Tensor, *, batch_size: int, device: torch.device, precision: str = "fp32",
              epoch: int | None = None, optimizer: torch.optim.Optimizer | None = None,
              generator: torch.Generator | None = None, desc: str = "") -> dict[str, float]:
    """One pass over `images`; trains when an optimizer is given. Returns image-weighted means of the
    model's loss terms (and, when it has latent codes, the active latent dimensions of an eval pass)."""
    training = optimizer is not None
    model.train(training)
    sums: dict[str, float] = {}
    codes, seen = [], 0
    bar = tqdm(batches(images, batch_size, device, generator), desc=desc, unit="batch", leave=False,
               total=math.ceil(len(images) / batch_size), mininterval=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.set_grad_enabled(training):
        for batch, x in enumerate(bar, start=1):  # not bar.n: a disabled bar (TQDM_DISABLE) never counts
            with autocast:
                loss = model.loss(x, epoch=epoch)
            if not torch.isfinite(loss.value):
                raise FloatingPointError(f"loss is {loss.value.item()} in batch {batch}")
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.value.backward()
                optimizer.step()
            elif loss.codes is not None:
                codes.append(loss.codes.detach().float().cpu())
            for name, value in loss.terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4g}", refresh=False)
    means = {name: total / seen for name, total in sums.items()}
    if codes:
        means["active_units"] = active_units(torch.cat(codes))
    return means
