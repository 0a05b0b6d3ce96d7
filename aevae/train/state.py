"""Everything a training needs to continue exactly where it stopped, and the files it keeps each epoch:
best.pt, history.csv and last.pt (the state a restart resumes from, bitwise)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from aevae.config.schema import Params
from aevae.files.atomic import atomic_path
from aevae.files.model_dir import ModelDir
from aevae.models.checkpoints import save_model
from aevae.models.contract import Model
from aevae.models.registry import build_model
from aevae.train.loop import EpochInterrupted, EpochProgress, make_optimizer, run_epoch

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
    partial: EpochProgress | None = None  # how far into epoch `epoch + 1` a stopped pass got
    epoch_generator: Tensor | None = None  # the generator's state before that epoch drew its order
    hardware: dict[str, str] | None = None  # what it trains on: {"device": ..., "precision": ...}


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
    saved = _load_resumable(last, model.kind, fingerprint, config)
    if saved is not None:
        model.load_state_dict(saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:  # the VAE's noise is drawn there
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        state.history, state.best_val, state.epoch, state.run_id = (
            saved["history"], saved["best_val"], saved["epoch"], saved["run_id"])
        state.best_weights, state.best_epoch = saved.get("best_state_dict"), saved.get("best_epoch", 0)
        state.partial = EpochProgress(**saved["partial"]) if saved.get("partial") else None
        state.hardware = saved.get("hardware")
        where = (f"in epoch {state.epoch + 1} after batch {state.partial.batches}" if state.partial
                 else f"after epoch {state.epoch}")
        log.info("%s: resuming %s from %s (MLflow run %s)", config, where, last, state.run_id)
    return state


def _load_resumable(path: Path, kind: str, fingerprint: dict, config: str) -> dict | None:
    """The state in last.pt when it is an unfinished run of this very configuration, else None; the log
    says why a last.pt that is there is not resumed (a job that starts over must say so)."""
    if not path.exists():
        log.info("%s: no saved state in %s: training from epoch 0", config, path)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt or foreign file: start over rather than trust it
        log.warning("%s: ignoring %s (%s: %s); training from epoch 0", config, path, type(err).__name__, err)
        return None
    if state.get("kind") != kind or state.get("fingerprint") != fingerprint:
        saved, wanted = (state.get("fingerprint") or {}).get("params", {}), fingerprint["params"]
        differ = sorted(key for key in saved.keys() | wanted.keys() if saved.get(key) != wanted.get(key))
        why = (f"it is a {state.get('kind')}" if state.get("kind") != kind else
               f"its params differ ({', '.join(differ)})" if differ else "it was trained on other data")
        log.warning("%s: not resuming %s: %s; training from epoch 0", config, path, why)
        return None
    if state.get("complete", True):
        log.info("%s: %s holds a finished training of these params: training again from epoch 0 (a "
                 "finished stage is restored by DVC, not run)", config, path)
        return None
    return state


def note_hardware(state: TrainingState, here: dict[str, str], name: str) -> None:
    """Record what the training runs on; a resumed one that ran elsewhere says so. train.device and
    train.precision "auto" resolve per machine, and a Slurm requeue may land on another kind of node: the
    training goes on (hours are not thrown away), but from here on it is not the uninterrupted run of
    either machine, and the log says it."""
    if state.hardware and state.hardware != here:
        log.warning("%s: resuming a training that ran on %s (%s) here on %s (%s): from epoch %d on it differs "
                    "from an uninterrupted run on either; set train.device and train.precision to keep one",
                    name, state.hardware.get("device"), state.hardware.get("precision"), here["device"],
                    here["precision"], state.epoch + 1)
    state.hardware = here


def train_one_epoch(state: TrainingState, train_x: Tensor, val_x: Tensor, params: Params, device: torch.device,
                    precision: str = "fp32", stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Train on every training image once (or what a stopped pass left), validate, step the scheduler;
    returns the epoch's history row. A non-finite loss raises FloatingPointError before anything of the
    epoch is kept; a stop request (`stop`) raises EpochInterrupted with `state.partial` set."""
    epoch = state.epoch + 1
    lr = state.optimizer.param_groups[0]["lr"]
    common = {"batch_size": params.batch_size, "device": device, "precision": precision}
    state.epoch_generator = state.generator.get_state()  # a resumed pass was put back to this very state
    try:
        train_terms = run_epoch(state.model, train_x, **common, epoch=epoch, optimizer=state.optimizer,
                                generator=state.generator, desc="train", done=state.partial, stop=stop)
    except EpochInterrupted as interrupted:
        state.partial = interrupted.progress
        raise
    state.partial = None
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
    """last.pt: the full state to resume from, `complete` once the last of `epochs` is done. Mid-epoch
    (a stopped pass) it also holds the pass's progress, and the generator as it was before the epoch drew
    its order, so the resumed pass draws the same order and skips the batches done."""
    mid_epoch = state.partial is not None
    save_model(out.last, state.model, epoch=state.epoch,
               val_loss=state.history[-1]["val_loss"] if state.history else None,
               best_val=state.best_val, history=state.history, fingerprint=fingerprint, run_id=state.run_id,
               best_state_dict=state.best_weights, best_epoch=state.best_epoch,
               complete=state.epoch == epochs and not mid_epoch, optimizer=state.optimizer.state_dict(),
               scheduler=state.scheduler.state_dict(),
               generator=state.epoch_generator if mid_epoch else state.generator.get_state(),
               torch_rng=torch.get_rng_state(), cuda_rng=_cuda_rng(state.model), hardware=state.hardware,
               partial=asdict(state.partial) if mid_epoch else None)


def _cuda_rng(model: Model) -> Tensor | None:
    """The CUDA generator's state when `model` trains on a GPU: the VAE draws its noise (randn_like) there,
    from a generator torch.get_rng_state does not cover; without it a resumed training would repeat the
    noise of epoch 1 and not end bitwise equal."""
    device = next(model.parameters()).device
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else None


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
