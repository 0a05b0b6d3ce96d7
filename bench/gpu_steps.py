"""What bench/gpu.py measures inside one process on one device: the training step as the pipeline runs it
(aevae.train.loop.run_epoch) and the variants that might pay on a GPU, each timed and its weights compared
with the pipeline's; where a step's time goes (torch.profiler); and whether a training stopped mid-epoch
resumes bitwise there (aevae.train.state, as tests/test_stop.py checks it on the CPU).

A variant is only worth adopting when it is faster *and* gives the pipeline's results in fp32; this module
measures both and decides nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from aevae.config.schema import Params
from aevae.models.registry import build_model
from aevae.train.loop import make_optimizer, run_epoch

BATCH = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(config: str, params: Params, device: torch.device, fused: bool):
    """The configuration's model and Adam as aevae.train.state.start_or_resume builds them (seeded, channels_last
    on `device`); `fused`: Adam's single-kernel CUDA implementation instead of torch's default (foreach)."""
    torch.manual_seed(0)
    model = build_model(config, params).to(device, memory_format=torch.channels_last)
    if fused:
        optimizer = torch.optim.Adam(model.param_groups(params.lr), lr=params.lr, weight_decay=params.weight_decay,
                                     fused=True)
    else:
        optimizer = make_optimizer(model, lr=params.lr, weight_decay=params.weight_decay)
    return model, optimizer


@contextmanager
def _cudnn(deterministic: bool, tf32: bool) -> Iterator[None]:
    """cuDNN's switches for one measurement, put back after it."""
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.conv.fp32_precision
    cudnn.deterministic, cudnn.conv.fp32_precision = deterministic, "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.conv.fp32_precision = before


def step_rate(config: str, params: Params, images: torch.Tensor, device: torch.device, precision: str, *,
              resident: bool = False, fused: bool = False, compiled: bool = False, deterministic: bool = False,
              tf32: bool = True) -> dict:
    """Training images/s of one pass over `images` (after a warm-up pass over two batches), and the weights
    it ends with (on the CPU, to compare variants).

    resident: the uint8 images sit on the device before the pass (the pipeline keeps them in host memory and
    moves each batch); fused: fused Adam; compiled: the model's loss through
    torch.compile(mode="reduce-overhead") (CUDA graphs on a GPU); deterministic: cuDNN's deterministic
    algorithms only; tf32: cuDNN may run fp32 convolutions in TF32 (torch's default, on Ampere and later)."""
    with _cudnn(deterministic, tf32):
        return _step_rate(config, params, images, device, precision, resident, fused, compiled)


def _step_rate(config: str, params: Params, images: torch.Tensor, device: torch.device, precision: str,
               resident: bool, fused: bool, compiled: bool) -> dict:
    model, optimizer = _build(config, params, device, fused)
    if compiled:
        model.loss = torch.compile(model.loss, mode="reduce-overhead")  # the instance's, for this measurement
    data = images.to(device) if resident else images
    step = {"batch_size": BATCH, "device": device, "precision": precision, "optimizer": optimizer}
    run_epoch(model, data[: 2 * BATCH], **step, epoch=1, generator=torch.Generator().manual_seed(1))  # warm-up
    torch.manual_seed(0)  # the VAE's noise: every variant draws the same
    _sync(device)
    start = time.perf_counter()
    terms = run_epoch(model, data, **step, epoch=1, generator=torch.Generator().manual_seed(0))
    _sync(device)
    seconds = time.perf_counter() - start
    weights = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return {"images_per_s": len(images) / seconds, "ms_per_step": 1000 * seconds / -(-len(images) // BATCH),
            "loss": terms["loss"], "weights": weights}


def weights_diff(a: dict, b: dict) -> dict:
    """Whether two weight sets are bitwise equal, and their largest absolute difference."""
    equal = all(torch.equal(a[k], b[k]) for k in a)
    return {"bitwise": equal, "max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in a)}


def variants(config: str, params: Params, images: torch.Tensor, device: torch.device, precision: str,
             compile_too: bool) -> list[dict]:
    """The pipeline's step and each variant: images/s, the speed-up over the pipeline, and its weights against
    the pipeline's, or for an "again" row against the run before it (is it deterministic on this device?)."""
    plans: list[tuple[str, dict]] = [
        ("pipeline", {}), ("pipeline, again", {}),
        ("cuDNN deterministic", {"deterministic": True}), ("cuDNN deterministic, again", {"deterministic": True}),
        ("no TF32 (true fp32 convolutions)", {"tf32": False}),
        ("data resident on the device", {"resident": True}), ("fused Adam", {"fused": True}),
        ("resident + fused Adam", {"resident": True, "fused": True})]
    if compile_too:
        plans.append(("resident + fused + torch.compile(reduce-overhead)",
                      {"resident": True, "fused": True, "compiled": True}))
    rows, reference, previous = [], None, None
    for name, options in plans:
        try:
            got = step_rate(config, params, images, device, precision, **options)
        except Exception as err:  # a variant that does not run here is a finding, not the end of the benchmark
            rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
            continue
        reference = reference or got
        against = previous if name.endswith(", again") and previous else reference
        rows.append({"variant": name, "images_per_s": round(got["images_per_s"], 1),
                     "ms_per_step": round(got["ms_per_step"], 3),
                     "speedup": round(got["images_per_s"] / reference["images_per_s"], 3),
                     **weights_diff(against["weights"], got["weights"])})
        previous = got
    return rows


def profile_steps(config: str, params: Params, images: torch.Tensor, device: torch.device, precision: str,
                  out: Path) -> dict:
    """Where the pipeline's step spends its time: torch.profiler over one pass; the device's busy time
    (the kernels' sum) against the wall time, and the table of the costliest operations (written to `out`)."""
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = _build(config, params, device, fused=False)
    step = {"batch_size": BATCH, "device": device, "precision": precision, "optimizer": optimizer, "epoch": 1}
    run_epoch(model, images[: 2 * BATCH], **step, generator=torch.Generator().manual_seed(1))  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run_epoch(model, images, **step, generator=torch.Generator().manual_seed(0))
        _sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out.write_text(events.table(sort_by=sort, row_limit=25) + "\n\n"
                   + events.table(sort_by="self_cpu_time_total", row_limit=25), encoding="utf-8")
    kernel_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0.0
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    steps = -(-len(images) // BATCH)
    return {"steps": steps, "wall_ms_per_step": round(1000 * wall / steps, 3),
            "kernel_ms_per_step": round(kernel_us / 1000 / steps, 3),
            "device_busy_fraction": round(kernel_us / 1e6 / wall, 3) if device.type == "cuda" else None,
            "host_waits_per_step": round(syncs / steps, 1) if device.type == "cuda" else None, "table": out.name}


def resume_check(config: str, params: Params, data: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                 precision: str, folder: Path, epochs: int = 2, stop_batch: int = 3) -> dict:
    """A training stopped after batch `stop_batch` of its last epoch and resumed from last.pt in a fresh state,
    against the same training uninterrupted, twice (two uninterrupted runs that differ mean the device's
    kernels are not deterministic, and no resume can be bitwise there)."""
    from aevae.files.model_dir import ModelDir
    from aevae.train.loop import EpochInterrupted
    from aevae.train.state import save_resume_state, start_or_resume, train_one_epoch

    train_x, val_x = data
    fingerprint = {"params": {"bench": config}, "data_sha256": "bench"}

    stops: list[int] = []  # batches done when a stop fired (the stopped run's, once)

    def run(name: str, stop_at: int | None) -> dict:
        out = ModelDir.of(folder / name, config, 0)
        out.path.mkdir(parents=True, exist_ok=True)
        state = start_or_resume(config, 0, params, out.last, fingerprint, device)
        while state.epoch < epochs:
            stop = _after_batch(stop_at) if stop_at and state.epoch + 1 == epochs else None
            try:
                train_one_epoch(state, train_x, val_x, params, device, precision, stop)
            except EpochInterrupted as interrupted:
                stops.append(interrupted.progress.batches)
                save_resume_state(state, out, fingerprint, epochs)
                state, stop_at = start_or_resume(config, 0, params, out.last, fingerprint, device), None
                continue
            save_resume_state(state, out, fingerprint, epochs)
        return {k: v.detach().float().cpu() for k, v in state.model.state_dict().items()}

    first, second, resumed = run("uninterrupted", None), run("uninterrupted-again", None), run("stopped", stop_batch)
    return {"config": config, "precision": precision, "epochs": epochs, "stopped_after_batch": stop_batch,
            "stops": stops,
            "uninterrupted_twice": weights_diff(first, second),
            "resumed_vs_uninterrupted": weights_diff(first, resumed)}


def _after_batch(batch: int) -> Callable[[], bool]:
    """A stop request that comes in during batch `batch` (run_epoch asks once after each batch)."""
    asked = iter(range(1, 1 << 30))
    return lambda: next(asked) == batch
