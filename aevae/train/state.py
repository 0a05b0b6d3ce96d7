"""Everything a training needs to continue exactly where it stopped, and the files it keeps each epoch:
best.pt, history.csv and last.pt (the state a restart resumes from, bitwise)."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aevae.config.schema import Params
from aevae.files.atomic import atomic_path
from aevae.files.model_dir import ModelDir
from aevae.models.checkpoints import save_model
from aevae.models.contract import Model
from aevae.models.registry import build_model
from aevae.train.loop import make_optimizer, run_epoch

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """Everything a training needs to continue exactly where it stopped; saved in last.pt every epoch."""

    model: Model
    optimizer: torch.optim.Adam
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    generator: torch.Generator
    history: list[dict[str, float]]
    best_val: float = math.inf
    best_weights: dict[str, Tensor] | None = None  # of the best validation epoch, to rewrite best.pt on resume
    best_epoch: int = 0
    epoch: int = 0  # the last complete epoch
    run_id: str | None = None  # the MLflow run it logs into


def start_or_resume(config: str, seed: int, params: Params, last: Path, fingerprint: dict,
                    device: torch.device) -> TrainingState:
    """A fresh, seeded state; or the one in `last` when it is an unfinished run of this very configuration
    (a crash, a kill), so that the run ends bitwise identical to an uninterrupted one."""
    torch.manual_seed(seed)
    model = build_model(config, params).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.train.plateau_factor, patience=params.train.plateau_patience)
    state = TrainingState(model, optimizer, scheduler, torch.Generator().manual_seed(seed), history=[])
    saved = _load_resumable(last, model.kind, fingerprint)
    if saved is not None:
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        state.history, state.best_val, state.epoch, state.run_id = (
            saved["history"], saved["best_val"], saved["epoch"], saved["run_id"])
        state.best_weights, state.best_epoch = saved.get("best_state_dict"), saved.get("best_epoch", 0)
        log.info("%s: resuming after epoch %d from %s (MLflow run %s)", config, state.epoch, last, state.run_id)
    return state


def _load_resumable(path: Path, kind: str, fingerprint: dict) -> dict | None:
    """The state in last.pt when it is an unfinished run of this very configuration, else None."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: start over rather than trust it
        log.warning("ignoring %s (%s: %s); training from scratch", path, type(err).__name__, err)
        return None
    if state.get("kind") != kind or state.get("fingerprint") != fingerprint or state.get("complete", True):
        return None
    return state


def train_one_epoch(state: TrainingState, train_x: Tensor, val_x: Tensor, params: Params,
                    device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Train on every training image once, validate, step the scheduler; returns the epoch's history row.
    A non-finite loss raises FloatingPointError before anything of the epoch is kept."""
    epoch = state.epoch + 1
    lr = state.optimizer.param_groups[0]["lr"]
    common = {"batch_size": params.batch_size, "device": device, "precision": precision}
    train_terms = run_epoch(state.model, train_x, **common, epoch=epoch, optimizer=state.optimizer,
                            generator=state.generator, desc="train")
    val_terms = run_epoch(state.model, val_x, **common, desc="val")
    state.scheduler.step(val_terms["loss"])
    row = {"epoch": epoch, "lr": lr, **{f"train_{k}": v for k, v in train_terms.items()},
           **{f"val_{k}": v for k, v in val_terms.items()}, **state.model.schedule(epoch)}
    state.history.append(row)
    state.epoch = epoch
    return row


def save_best_and_history(state: TrainingState, out: ModelDir) -> None:
    """best.pt when the last epoch improved validation, and history.csv."""
    row = state.history[-1]
    if row["val_loss"] < state.best_val:
        state.best_val, state.best_epoch = row["val_loss"], state.epoch
        state.best_weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        save_model(out.best, state.model, epoch=state.epoch, val_loss=state.best_val)
    write_history(out.history, state.history)


def save_resume_state(state: TrainingState, out: ModelDir, fingerprint: dict, epochs: int) -> None:
    """last.pt: the full state to resume from, `complete` once the last of `epochs` is done."""
    save_model(out.last, state.model, epoch=state.epoch, val_loss=state.history[-1]["val_loss"],
               best_val=state.best_val, history=state.history, fingerprint=fingerprint, run_id=state.run_id,
               best_state_dict=state.best_weights, best_epoch=state.best_epoch,
               complete=state.epoch == epochs, optimizer=state.optimizer.state_dict(),
               scheduler=state.scheduler.state_dict(), generator=state.generator.get_state(),
               torch_rng=torch.get_rng_state())


def restore_best(state: TrainingState, params: Params, out: ModelDir) -> None:
    """best.pt as it was when training stopped: DVC deletes a stage's outputs before running it again, and
    the epochs still to come may never beat the best one behind us."""
    if state.best_weights is None or out.best.exists():
        return
    with torch.random.fork_rng(devices=[]):  # building a model draws weights: leave the resumed RNG as it was
        best = build_model(out.config, params)
    best.load_state_dict(state.best_weights)
    save_model(out.best, best, epoch=state.best_epoch, val_loss=state.best_val)


def write_history(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]
