"""One pass over a split: the batches, the model's loss, the optimizer step; the same for every kind."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aevae.data.tensors import batches
from aevae.models.contract import Model, active_units


def make_optimizer(model: Model, *, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam over the model's own parameter groups (each model says which of its layers need another lr)."""
    return torch.optim.Adam(model.param_groups(lr), lr=lr, weight_decay=weight_decay)


@dataclass
class EpochProgress:
    """How far a training pass got: batches done and the sums of their loss terms. With the generator's
    state from before the epoch drew its order, it is what a pass stopped mid-epoch needs to go on bitwise."""

    batches: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0


class EpochInterrupted(Exception):
    """A stop was requested: the pass ended after `progress.batches` batches (the optimizer stepped on each)."""

    def __init__(self, progress: EpochProgress, total: int) -> None:
        super().__init__(f"after batch {progress.batches} of {total}")
        self.progress, self.total = progress, total


def run_epoch(model: Model, images: Tensor, *, batch_size: int, device: torch.device, precision: str = "fp32",
              epoch: int | None = None, optimizer: torch.optim.Optimizer | None = None,
              generator: torch.Generator | None = None, desc: str = "", done: EpochProgress | None = None,
              stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One pass over `images`; trains when an optimizer is given. Returns image-weighted means of the
    model's loss terms (and, when it has latent codes, the active latent dimensions of an eval pass).

    Training only: `done` continues a pass stopped mid-epoch (the generator must be back at its state from
    before the epoch, so it draws the same order; the batches done are skipped); `stop`, asked after every
    batch, ends the pass early by raising EpochInterrupted with the progress so far."""
    training = optimizer is not None
    model.train(training)
    done = done or EpochProgress()
    sums: dict[str, float] = dict(done.sums)
    codes, seen = [], done.seen
    total = math.ceil(len(images) / batch_size)
    bar = tqdm(batches(images, batch_size, device, generator, skip=done.batches), desc=desc, unit="batch",
               leave=False, total=total, initial=done.batches, mininterval=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.set_grad_enabled(training):
        # not bar.n: a disabled bar (TQDM_DISABLE) never counts
        for batch, x in enumerate(bar, start=done.batches + 1):
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
            if training and stop is not None and stop():
                raise EpochInterrupted(EpochProgress(batch, sums, seen), total)
    means = {name: total / seen for name, total in sums.items()}
    if codes:
        means["active_units"] = active_units(torch.cat(codes))
    return means
