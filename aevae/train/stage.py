"""The train stage: one model configuration with one seed, from the prepared data to best.pt, logged to
MLflow; resumed after a kill, and trained once when parallel workers ask for it at the same moment."""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from aevae import AevaeError
from aevae.config.schema import Params
from aevae.data.load import load_split, read_manifest
from aevae.data.tensors import to_uint8, to_unit
from aevae.files.model_dir import ModelDir
from aevae.machine.cores import CoreShare
from aevae.machine.device import cpu_isa, pick_device, pick_precision
from aevae.models.checkpoints import load_model
from aevae.models.contract import Model
from aevae.models.registry import build_model
from aevae.tracking.provenance import Pipeline
from aevae.tracking.runs import pipeline_stage, training_run
from aevae.tracking.training_log import log_epoch, log_images, log_trained_model
from aevae.train.dedupe import trained_dir, training_key, training_once
from aevae.train.loop import EpochInterrupted
from aevae.train.state import (
    TrainingState,
    note_hardware,
    read_history,
    restore_best,
    save_best_and_history,
    save_resume_state,
    start_or_resume,
    train_one_epoch,
)
from aevae.train.stop import Stopped, StopSignals

log = logging.getLogger(__name__)


def training_params(config: str, seed: int, params: Params) -> dict[str, object]:
    """The params one training reads (its dvc.yaml stage lists the same), as logged to MLflow: the shared
    ones, its own configuration as model.<key> and its seed as train.seed; not the other configurations,
    the seed list, nor tuning, evaluation, report and tracking settings."""
    entry = params.models[config]
    shared = {key: value for key, value in params.flat().items()
              if key.split(".")[0] not in ("models", "tune", "eval", "report", "tracking") and key != "train.seeds"}
    return {**shared, "train.seed": seed, "model.kind": entry.kind,
            **{f"model.{key}": value for key, value in entry.settings().items()}}


def read_tuned(path: Path, config: str) -> dict[str, Any]:
    """The settings tune@<config> chose (tuned/<config>.json); none when tuning is off."""
    try:
        chosen = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AevaeError(f"{path} not found: run the tuning stage first (dvc repro tune@{config})") from None
    except json.JSONDecodeError:
        raise AevaeError(f"{path} is not JSON: run the tuning stage again (dvc repro -f tune@{config})") from None
    if chosen.get("config") != config:
        raise AevaeError(f"{path} holds the tuning of {chosen.get('config')!r}, not of {config!r}: pass "
                         f"tuned/{config}.json")
    return chosen.get("settings") or {}


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


class Diverged(AevaeError):
    """The loss became NaN or infinite: the message names the epoch, the batch and the last good checkpoint."""


@dataclass(frozen=True)
class Nested:
    """Where a training that is not one of the study's (a tuning trial) logs: under `parent_id`, with `tags`."""

    parent_id: str
    tags: dict[str, str]


def train(params: Params, data_dir: Path, out: ModelDir, settings: dict[str, Any] | None = None,
          nested: Nested | None = None) -> list[dict[str, Any]]:
    """Train the configuration `out.config` with the seed `out.seed` into `out` (best.pt, last.pt,
    history.csv, run.json) and log it to MLflow: with `settings` (chosen by tuning, or a trial's) over its
    entry in params.yaml, under the pipeline's parent run or as `nested` says.

    A restart after a crash or a kill resumes from last.pt, in the same MLflow run. A configuration that
    another queue worker is training at this moment is not trained twice: this one waits and takes its
    outputs (aevae.train.dedupe).
    """
    out.path.mkdir(parents=True, exist_ok=True)
    pipeline_params, params = params, params.for_config(out.config, settings)
    build_model(out.config, params)  # a bad configuration is an error before the data is read
    train_x, val_x, data_sha256 = load_training_data(data_dir, params.data.image_size)
    fingerprint = {"params": training_params(out.config, out.seed, params), "data_sha256": data_sha256}
    # The stage's params in dvc.yaml also list tracking.*: a different logging setting is another run.
    tracking_params = {k: v for k, v in params.flat().items() if k.startswith("tracking.")}
    key = training_key(out.config, {**fingerprint, "tracking": tracking_params})
    with training_once(key, out, trained_dir()) as must_train:
        if not must_train:
            return read_history(out.history)
        where = nested or Pipeline.of(pipeline_params.flat(), data_sha256)  # one parent run per pipeline
        return _train_here(params, (train_x, val_x), fingerprint, out, where)


def _train_here(params: Params, data: tuple[Tensor, Tensor], fingerprint: dict[str, Any], out: ModelDir,
                where: Pipeline | Nested) -> list[dict[str, Any]]:
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    device = pick_device(params.train.device)
    precision = pick_precision(params.train.precision, device)
    train_x, val_x = data
    state = start_or_resume(out.config, out.seed, params, out.last, fingerprint, device)
    restore_best(state, params, out)
    name = f"{out.config}-seed{out.seed}"
    isa = cpu_isa() if device.type == "cpu" else torch.cuda.get_device_name(device)
    note_hardware(state, {"device": isa, "precision": precision}, name)
    log.info("%s: %d train / %d val images of %dpx on %s (%s, %s), %d epochs", name, len(train_x), len(val_x),
             params.data.image_size, device, isa, precision, params.epochs)
    tags = {**where.tags, "model_config": out.config, "model_kind": state.model.kind,
            "model_label": state.model.label, "precision": precision, "device": isa}
    parent_run = nullcontext(where.parent_id) if isinstance(where, Nested) else pipeline_stage(where)
    with CoreShare() as cores, parent_run as parent, training_run(
            name, fingerprint["params"], tags, run_id=state.run_id, run_file=out.run_file, parent_id=parent,
            system_metrics=params.tracking.system_metrics) as run_id, StopSignals() as stop:
        state.run_id = run_id
        _epochs(state, params, (train_x, val_x), fingerprint, out, (device, precision), cores, stop)
        log_trained_model(out, state.best_val, load_model(out.best)[0])
    return state.history


def _epochs(state: TrainingState, params: Params, data: tuple[Tensor, Tensor], fingerprint: dict[str, Any],
            out: ModelDir, hardware: tuple[torch.device, str], cores: CoreShare, stop: StopSignals) -> None:
    """The epochs still to run: train, validate, keep the files, log the row (and every images_every
    epochs the progress images); a diverged loss stops with the last good checkpoint named, a stop request
    (aevae.train.stop) after the batch it came in, with the state saved in last.pt."""
    (train_x, val_x), (device, precision) = data, hardware
    name, all_threads = f"{out.config}-seed{out.seed}", torch.get_num_threads()
    every, fixed = params.tracking.images_every, val_x[: params.tracking.image_count]
    epochs = tqdm(range(state.epoch + 1, params.epochs + 1), desc=f"train {name}", unit="epoch",
                  initial=state.epoch, total=params.epochs)
    for _ in epochs:
        if stop():  # it came in after the last batch of an epoch, whose state is saved
            raise Stopped(_stopped(stop, name, f"after epoch {state.epoch}", out))
        if not params.train.threads:
            _take_fair_share(cores, all_threads)
        try:
            row = train_one_epoch(state, train_x, val_x, params, device, precision, stop)
        except EpochInterrupted as interrupted:
            save_resume_state(state, out, fingerprint, params.epochs)
            raise Stopped(_stopped(stop, name, f"in epoch {state.epoch + 1} {interrupted}", out)) from None
        except FloatingPointError as err:
            last_good = f"{out.last} (epoch {state.epoch})" if state.epoch else "none"
            raise Diverged(f"{name} training diverged in epoch {state.epoch + 1}: {err} at lr "
                             f"{state.optimizer.param_groups[0]['lr']:g}; last good checkpoint: {last_good}; "
                             "lower lr and run again") from None
        save_best_and_history(state, out)
        # MLflow gets the row before last.pt is replaced: a kill in between repeats this epoch's point
        # instead of losing it.
        log_epoch(row)
        save_resume_state(state, out, fingerprint, params.epochs)
        if every and (state.epoch % every == 0 or state.epoch == params.epochs):
            log_images(progress_images(state.model, fixed, device, out.seed), step=state.epoch)
        epochs.set_postfix(train=f"{row['train_loss']:.4g}", val=f"{row['val_loss']:.4g}")
        log.info("%s epoch %d/%d  %s", name, state.epoch, params.epochs,
                 "  ".join(f"{k}={v:.5g}" for k, v in row.items() if k != "epoch"))


def _stopped(stop: StopSignals, name: str, where: str, out: ModelDir) -> str:
    message = (f"{name} stopped by {stop.requested} {where}; its state is saved in {out.last}: run the stage "
               "again to resume from there")
    log.warning(message)
    return message


def _take_fair_share(cores: CoreShare, all_threads: int) -> None:
    """train.threads: 0 -> as many torch threads as this training's share of the machine's cores."""
    threads = cores.threads(all_threads)
    if threads != torch.get_num_threads():
        log.info("%d aevae trainings running on this machine: %d of %d torch threads for this one",
                 cores.running(), threads, all_threads)
        torch.set_num_threads(threads)


@torch.no_grad()
def progress_images(model: Model, fixed: Tensor, device: torch.device, seed: int) -> dict[str, Any]:
    """What MLflow shows of a training as it goes (uint8 pictures): fixed validation images above their
    reconstructions and, for a generative model, decodings of fixed prior draws. Eval mode and a generator
    of its own: the training's batch statistics and random state are left exactly as they were (resume stays
    bitwise). torchvision's make_grid: the report's labelled grids are not training's business."""
    from torchvision.utils import make_grid

    def picture(*rows: Tensor) -> Any:
        grid = make_grid(torch.cat(rows).float().cpu(), nrow=len(rows[0]), padding=2, pad_value=1.0)
        return to_uint8(grid[None])[0]

    model.eval()
    x = to_unit(fixed).to(device)
    images = {"val_reconstructions": picture(x, model.reconstruct(x).clamp(0, 1))}
    if model.generative:
        images["prior_samples"] = picture(model.sample(len(x), torch.Generator().manual_seed(seed)))
    return images
