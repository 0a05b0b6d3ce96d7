"""The training loop every model shares: explicit, seeded, checkpointed every epoch, resumable."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aevae import AevaeError
from aevae.checkpoints import load_model, save_model
from aevae.cores import CoreShare
from aevae.data import load_split, read_manifest
from aevae.files import ModelDir, atomic_path, trained_dir
from aevae.hardware import cpu_isa, pick_device, pick_precision
from aevae.images import batches, image_grid, to_uint8, to_unit
from aevae.models import Model, active_units, build_model
from aevae.once import training_key, training_once
from aevae.outbox import log_epoch, log_images, log_trained_model
from aevae.params import Params
from aevae.runs import Pipeline, pipeline_stage, training_run

log = logging.getLogger(__name__)


def training_params(config: str, seed: int, params: Params) -> dict[str, object]:
    """The params one training reads (its dvc.yaml stage lists the same), as logged to MLflow: the shared
    ones, its own configuration as model.<key> and its seed as train.seed; not the other configurations,
    the seed list, nor evaluation, report and tracking settings."""
    entry = params.models[config]
    shared = {key: value for key, value in params.flat().items()
              if key.split(".")[0] not in ("models", "eval", "report", "tracking") and key != "train.seeds"}
    return {**shared, "train.seed": seed, "model.kind": entry.kind,
            **{f"model.{key}": value for key, value in entry.settings().items()}}


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
        for x in bar:
            with autocast:
                loss = model.loss(x, epoch=epoch)
            if not torch.isfinite(loss.value):
                raise FloatingPointError(f"loss is {loss.value.item()} in batch {bar.n + 1}")
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


def save_epoch(state: TrainingState, out: ModelDir, fingerprint: dict, epochs: int) -> None:
    """best.pt when validation improved, history.csv, then last.pt: the full state to resume from."""
    row = state.history[-1]
    if row["val_loss"] < state.best_val:
        state.best_val, state.best_epoch = row["val_loss"], state.epoch
        state.best_weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        save_model(out.best, state.model, epoch=state.epoch, val_loss=state.best_val)
    _write_history(out.history, state.history)
    # MLflow gets the row before last.pt is replaced: a kill in between repeats this epoch's point
    # instead of losing it.
    log_epoch(row)
    save_model(out.last, state.model, epoch=state.epoch, val_loss=row["val_loss"], best_val=state.best_val,
               history=state.history, fingerprint=fingerprint, run_id=state.run_id,
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


def _take_fair_share(cores: CoreShare, all_threads: int) -> None:
    """train.threads: 0 -> as many torch threads as this training's share of the machine's cores."""
    threads = cores.threads(all_threads)
    if threads != torch.get_num_threads():
        log.info("%d aevae trainings running on this machine: %d of %d torch threads for this one",
                 cores.running(), threads, all_threads)
        torch.set_num_threads(threads)


@torch.no_grad()
def progress_images(model: Model, fixed: Tensor, device: torch.device, seed: int) -> dict[str, Any]:
    """What MLflow shows of a training as it goes: reconstructions of fixed validation images and, for a
    generative model, decodings of fixed prior draws. Eval mode and a generator of its own: the training's
    batch statistics and random state are left exactly as they were (resume stays bitwise)."""
    model.eval()
    x = to_unit(fixed).to(device)
    grid = image_grid({"validation": to_uint8(x), model.label: to_uint8(model.reconstruct(x))})
    images = {"val_reconstructions": grid}
    if model.generative:
        samples = model.sample(len(x), torch.Generator().manual_seed(seed))
        images["prior_samples"] = image_grid({"z ~ N(0, I)": to_uint8(samples)})
    return images


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def load_training_data(data_dir: Path, image_size: int) -> tuple[Tensor, Tensor, str]:
    """Train and validation images as (N, H, W, 3) uint8 tensors (no copy), and the data's sha256."""
    manifest = read_manifest(data_dir)
    if manifest["image_size"] != image_size:
        raise AevaeError(f"{data_dir} holds {manifest['image_size']}px images but data.image_size is {image_size}; "
                         "run the prepare stage again (dvc repro)")
    train_x, val_x = (torch.from_numpy(load_split(data_dir, split)) for split in ("train", "val"))
    if len(train_x) < 2:
        raise AevaeError(f"{data_dir} has {len(train_x)} training image(s); training needs at least 2")
    return train_x, val_x, manifest["sha256"]


def train(params: Params, data_dir: Path, out: ModelDir) -> list[dict[str, Any]]:
    """Train the configuration `out.config` with the seed `out.seed` into `out` (best.pt, last.pt,
    history.csv, run.json) and log it to MLflow.

    A restart after a crash or a kill resumes from last.pt, in the same MLflow run. A configuration that
    another queue worker is training at this moment is not trained twice: this one waits and takes its
    outputs (aevae.once).
    """
    out.path.mkdir(parents=True, exist_ok=True)
    build_model(out.config, params)  # a bad configuration is an error before the data is read
    train_x, val_x, data_sha256 = load_training_data(data_dir, params.data.image_size)
    fingerprint = {"params": training_params(out.config, out.seed, params), "data_sha256": data_sha256}
    # The stage's params in dvc.yaml also list tracking.*: a different logging setting is another run.
    tracking_params = {k: v for k, v in params.flat().items() if k.startswith("tracking.")}
    key = training_key(out.config, {**fingerprint, "tracking": tracking_params})
    with training_once(key, out, trained_dir()) as must_train:
        if not must_train:
            return read_history(out.history)
        return _train_here(params, (train_x, val_x, data_sha256), fingerprint, out)


def read_history(path: Path) -> list[dict[str, float]]:
    with path.open(newline="", encoding="utf-8") as f:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(f)]


def _train_here(params: Params, data: tuple[Tensor, Tensor, str], fingerprint: dict[str, Any],
                out: ModelDir) -> list[dict[str, Any]]:
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    device = pick_device(params.train.device)
    precision = pick_precision(params.train.precision, device)
    train_x, val_x, data_sha256 = data
    state = start_or_resume(out.config, out.seed, params, out.last, fingerprint, device)
    restore_best(state, params, out)
    name = f"{out.config}-seed{out.seed}"
    isa = cpu_isa() if device.type == "cpu" else torch.cuda.get_device_name(device)
    log.info("%s: %d train / %d val images of %dpx on %s (%s, %s), %d epochs", name, len(train_x), len(val_x),
             params.data.image_size, device, isa, precision, params.epochs)
    pipeline = Pipeline.of(params.flat(), data_sha256)
    tags = {**pipeline.tags, "model_config": out.config, "model_kind": state.model.kind,
            "model_label": state.model.label, "precision": precision, "device": isa}
    every, fixed = params.tracking.images_every, val_x[: params.tracking.image_count]
    all_threads = torch.get_num_threads()
    with CoreShare() as cores, pipeline_stage(pipeline) as parent, training_run(
            name, fingerprint["params"], tags, run_id=state.run_id, run_file=out.run_file, parent_id=parent,
            system_metrics=params.tracking.system_metrics) as run_id:
        state.run_id = run_id
        epochs = tqdm(range(state.epoch + 1, params.epochs + 1), desc=f"train {name}", unit="epoch",
                      initial=state.epoch, total=params.epochs)
        for _ in epochs:
            if not params.train.threads:
                _take_fair_share(cores, all_threads)
            try:
                row = train_one_epoch(state, train_x, val_x, params, device, precision)
            except FloatingPointError as err:
                last_good = f"{out.last} (epoch {state.epoch})" if state.epoch else "none"
                raise AevaeError(f"{name} training diverged in epoch {state.epoch + 1}: {err} at lr "
                                 f"{state.optimizer.param_groups[0]['lr']:g}; last good checkpoint: {last_good}; "
                                 "lower lr and run again") from None
            save_epoch(state, out, fingerprint, params.epochs)
            if every and (state.epoch % every == 0 or state.epoch == params.epochs):
                log_images(progress_images(state.model, fixed, device, out.seed), step=state.epoch)
            epochs.set_postfix(train=f"{row['train_loss']:.4g}", val=f"{row['val_loss']:.4g}")
            log.info("%s epoch %d/%d  %s", name, state.epoch, params.epochs,
                     "  ".join(f"{k}={v:.5g}" for k, v in row.items() if k != "epoch"))
        log_trained_model(out, state.best_val, load_model(out.best)[0])
    return state.history
