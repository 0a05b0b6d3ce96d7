"""The training loop shared by the AE and the VAE: explicit, seeded, checkpointed every epoch."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from aevae import AevaeError
from aevae.data import load_split, read_manifest
from aevae.files import atomic_path
from aevae.models import (
    VAE,
    AutoEncoder,
    active_units,
    build_model,
    kl_divergence,
    reconstruction_error,
    save_model,
)
from aevae.params import Params

log = logging.getLogger(__name__)

BEST, LAST, HISTORY = "best.pt", "last.pt", "history.csv"


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AevaeError("train.device is cuda but no CUDA device is visible; use train.device: auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def to_tensor(images: np.ndarray) -> Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) uint8 view, channels_last in memory: no copy made."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def batches(images: Tensor, batch_size: int, device: torch.device,
            generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Float batches in [0, 1]; shuffled when a generator is given."""
    n = len(images)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start: start + batch_size]
        if generator is not None and len(idx) < 2:
            continue  # BatchNorm cannot normalise a batch of one image in training mode
        # channels_last: oneDNN's fastest layout for these convolutions (+3-11% per step, bench/run.py)
        yield images[idx].to(device, non_blocking=True).float().div_(255).contiguous(memory_format=torch.channels_last)


def make_optimizer(model: AutoEncoder | VAE, params: Params) -> torch.optim.Adam:
    """Adam at `lr`, except the VAE's Gaussian heads, which get lr * 1024 / fan_in.

    The heads are dense layers over the whole 256x8x8 feature map (fan-in 16384) with no normalisation
    after them. Adam moves every weight by about lr per step, all in the same direction early on, so
    at lr 0.002 log-variance jumps by ~15 within a few steps, KL reaches 1e4-1e12 nats and Adam's second
    moments never recover (measured). Scaling a dense layer's Adam lr by 1/fan_in is the muP rule
    (Yang et al. 2022); 1024 is the trunk's typical fan-in, so at 64px the heads learn at lr/16.
    """
    if not isinstance(model, VAE):
        return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    heads = [*model.to_mu.parameters(), *model.to_logvar.parameters()]
    head_ids = {id(p) for p in heads}
    rest = [p for p in model.parameters() if id(p) not in head_ids]
    head_scale = min(1.0, 1024 / model.to_mu.in_features)
    return torch.optim.Adam([{"params": rest}, {"params": heads, "lr": params.lr * head_scale}],
                            lr=params.lr, weight_decay=params.weight_decay)


def kl_weight(params: Params, epoch: int) -> float:
    """beta, ramped up linearly over the first kl_warmup_epochs epochs (Bowman et al. 2016)."""
    warmup = params.vae.kl_warmup_epochs
    return params.vae.beta * min(1.0, epoch / warmup) if warmup else params.vae.beta


def losses(model: AutoEncoder | VAE, x: Tensor, beta: float) -> dict[str, Tensor]:
    """Batch means of each term. AE: per-pixel MSE as in the study; VAE: nats per image."""
    if isinstance(model, VAE):
        x_hat, mu, logvar = model(x)
        mu, logvar = mu.float(), logvar.float()  # KL sums many terms: keep it in fp32 under autocast
        recon = reconstruction_error(x_hat.float(), x).mean()
        kl = kl_divergence(mu, logvar).mean()
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "mse": recon / x[0].numel(), "mu": mu}
    mse = F.mse_loss(model(x).float(), x)
    return {"loss": mse, "mse": mse}


def run_epoch(model: AutoEncoder | VAE, images: Tensor, params: Params, device: torch.device, beta: float,
              optimizer: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None,
              desc: str = "") -> dict[str, float]:
    """One pass over `images`; trains when an optimizer is given. Returns image-weighted means."""
    training = optimizer is not None
    model.train(training)
    sums: dict[str, float] = {}
    mus, seen = [], 0
    bar = tqdm(batches(images, params.batch_size, device, generator), desc=desc, unit="batch", leave=False,
               total=math.ceil(len(images) / params.batch_size), mininterval=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=params.train.precision == "bf16")
    with torch.set_grad_enabled(training):
        for x in bar:
            with autocast:
                terms = losses(model, x, beta)
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"loss is {terms['loss'].item()} in batch {bar.n + 1}")
            if training:
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()
            mu = terms.pop("mu", None)
            if mu is not None and not training:
                mus.append(mu.detach().float().cpu())
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.4g}", refresh=False)
    means = {name: total / seen for name, total in sums.items()}
    if mus:
        means["active_units"] = active_units(torch.cat(mus))
    return means


def _history_row(epoch: int, lr: float, beta: float, train: dict, val: dict) -> dict[str, float]:
    row = {"epoch": epoch, "lr": lr}
    row.update({f"train_{k}": v for k, v in train.items()})
    row.update({f"val_{k}": v for k, v in val.items()})
    if "kl" in train:
        row["kl_weight"] = beta
    return row


def _write_history(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def stage_params(kind: str, params: Params) -> dict[str, object]:
    """The params a training stage reads (dvc.yaml lists the same), as logged to MLflow."""
    return {k: v for k, v in params.flat().items()
            if not k.startswith(("eval.", "report.")) and (kind == "vae" or not k.startswith("vae."))}


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


def train(kind: str, params: Params, data_dir: Path, out_dir: Path) -> list[dict[str, float]]:
    """Train one model, writing best.pt, last.pt, history.csv and run.json to `out_dir`.

    last.pt holds the full state after every epoch; if it belongs to an unfinished run with the same
    params and data (a crash, a kill), training resumes from it and logs into the same MLflow run.
    """
    from aevae import tracking

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if params.train.threads:
        torch.set_num_threads(params.train.threads)
    device = pick_device(params.train.device)
    manifest = read_manifest(data_dir)
    image_size = params.data.image_size
    if manifest["image_size"] != image_size:
        raise AevaeError(f"{data_dir} holds {manifest['image_size']}px images but data.image_size is {image_size}; "
                         "run the prepare stage again (dvc repro)")
    train_x, val_x = (to_tensor(load_split(data_dir, split)) for split in ("train", "val"))
    if len(train_x) < 2:
        raise AevaeError(f"{data_dir} has {len(train_x)} training image(s); training needs at least 2")

    torch.manual_seed(params.seed)
    model = build_model(kind, image_size, params.vae.latent_dim).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, params)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.train.plateau_factor, patience=params.train.plateau_patience)
    generator = torch.Generator().manual_seed(params.seed)
    logged_params = stage_params(kind, params)
    fingerprint = {"params": logged_params, "data_sha256": manifest["sha256"]}

    history: list[dict[str, float]] = []
    best_val, first_epoch, run_id = math.inf, 1, None
    state = _load_resumable(out_dir / LAST, kind, fingerprint)
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, best_val, run_id = state["history"], state["best_val"], state["run_id"]
        first_epoch = state["epoch"] + 1
        log.info("%s: resuming after epoch %d from %s (MLflow run %s)", kind, state["epoch"], out_dir / LAST, run_id)
    log.info("%s: %d train / %d val images of %dpx on %s, %d epochs", kind, len(train_x), len(val_x),
             image_size, device, params.epochs)

    with tracking.start_run(kind, logged_params, tracking.run_tags(manifest["sha256"], params.flat()), run_id=run_id) as run:
        import mlflow

        tracking.write_run_file(out_dir / tracking.RUN_FILE, run)
        epochs = tqdm(range(first_epoch, params.epochs + 1), desc=f"train {kind}", unit="epoch",
                      initial=first_epoch - 1, total=params.epochs)
        for epoch in epochs:
            beta = kl_weight(params, epoch)
            lr = optimizer.param_groups[0]["lr"]
            try:
                train_terms = run_epoch(model, train_x, params, device, beta, optimizer, generator, desc="train")
                # Validation always weighs KL by the final beta, so val_loss is comparable across epochs.
                val_terms = run_epoch(model, val_x, params, device, params.vae.beta, desc="val")
            except FloatingPointError as err:
                last_good = f"{out_dir / LAST} (epoch {epoch - 1})" if epoch > 1 else "none"
                raise AevaeError(f"{kind} training diverged in epoch {epoch}: {err} at lr {lr:g}; last good "
                                 f"checkpoint: {last_good}; lower lr and run again") from None
            scheduler.step(val_terms["loss"])
            row = _history_row(epoch, lr, beta, train_terms, val_terms)
            history.append(row)
            if val_terms["loss"] < best_val:
                best_val = val_terms["loss"]
                save_model(out_dir / BEST, model, kind, image_size, epoch=epoch, val_loss=best_val)
            _write_history(out_dir / HISTORY, history)
            # Metrics before last.pt: a kill in between repeats this epoch's point instead of losing it.
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            save_model(out_dir / LAST, model, kind, image_size, epoch=epoch, val_loss=val_terms["loss"],
                       best_val=best_val, history=history, fingerprint=fingerprint, run_id=run.info.run_id,
                       complete=epoch == params.epochs, optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict(), generator=generator.get_state(),
                       torch_rng=torch.get_rng_state())
            epochs.set_postfix(train=f"{train_terms['loss']:.4g}", val=f"{val_terms['loss']:.4g}")
            log.info("%s epoch %d/%d  %s", kind, epoch, params.epochs,
                     "  ".join(f"{k}={v:.5g}" for k, v in row.items() if k != "epoch"))
        mlflow.log_metric("best_val_loss", best_val)
        mlflow.log_artifact(str(out_dir / BEST), artifact_path="checkpoints")
        mlflow.log_artifact(str(out_dir / HISTORY))
    return history
