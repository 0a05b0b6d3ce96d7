"""Scale check: prepare and load a large image folder, and report peak memory and what prepare's look for
near-duplicates across the train/test boundary (aevae.data.near_duplicates) costs, as a share of prepare.

    python bench/scale.py --images 20000 200000   # about 4 minutes on a 2-core CPU, plus 1 to generate the JPEGs once

Generates the JPEGs of each size once (bench/out/scale/jpegs-<n>), then runs each step in its own process
and reads that process's peak RSS, so the numbers are the steps' own.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import OUT as BENCH_OUT
from common import REPO, answer_child, child, machine

OUT = BENCH_OUT / "scale"
MODEL = "vae"  # the default study's VAE configuration (aevae.config.schema.Params().models), the largest model
STEPS = 5


def _write_jpegs(args: tuple[int, int, int]) -> None:
    import numpy as np
    from PIL import Image

    n, start, stop = args
    rng = np.random.default_rng(start)
    folder = OUT / f"jpegs-{n}" / f"{start // 10000:03d}"  # 10,000 files per folder, as data sets are laid out
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, stop):
        small = rng.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 80), Image.Resampling.BILINEAR).save(folder / f"{i:07d}.jpg", quality=85)


def generate(n: int) -> None:
    done = OUT / f"jpegs.{n}.done"
    if done.exists():
        return
    chunks = [(n, s, min(s + 10000, n)) for s in range(0, n, 10000)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_jpegs, chunks))
    done.write_text("ok")


def step_prepare(n: int) -> dict:
    from aevae.data.params import DataParams
    from aevae.data.prepare import prepare

    start = time.perf_counter()
    prepared = prepare(DataParams(source="folder", path=str(OUT / f"jpegs-{n}")), seed=0, out=OUT / "prepared")
    return {"seconds": time.perf_counter() - start, "counts": prepared.counts, "skipped": len(prepared.skipped),
            "near_duplicates": prepared.near_duplicates}


def step_load_and_train() -> dict:
    """What the training stage holds: the train and val arrays in memory, plus a few real steps."""
    import torch

    from aevae.config.schema import Params
    from aevae.data.load import load_split
    from aevae.data.tensors import batches
    from aevae.models.registry import build_model
    from aevae.train.loop import make_optimizer

    start = time.perf_counter()
    # As aevae.train.stage.load_training_data holds them: (N, H, W, 3) uint8 tensors over the loaded arrays.
    train_x, val_x = (torch.from_numpy(load_split(OUT / "prepared", s)) for s in ("train", "val"))
    loaded = time.perf_counter() - start
    params = Params()
    model = build_model(MODEL, params).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, lr=params.lr, weight_decay=params.weight_decay)
    for step, x in enumerate(batches(train_x, params.batch_size, torch.device("cpu"), torch.Generator())):
        loss = model.loss(x, epoch=1).value
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == STEPS - 1:
            break
    array_mib = (train_x.numel() + val_x.numel()) / 2**20
    return {"load_seconds": loaded, "arrays_mib": array_mib, "model": model.label}


def measure(n: int) -> list[str]:
    start = time.perf_counter()
    generate(n)
    print(f"{n} JPEGs ready in {time.perf_counter() - start:.0f} s", flush=True)
    prep = child(Path(__file__), "prepare", str(n))
    look = prep["near_duplicates"]
    lines = [f"- prepare: {prep['seconds']:.0f} s ({n / prep['seconds']:.0f} images/s), counts "
             f"{prep['counts']}, {prep['skipped']} skipped, peak {prep['peak_mib']:.0f} MiB",
             f"  - of which the look for near-duplicates: {look['seconds']:.1f} s "
             f"({look['seconds'] / prep['seconds']:.1%} of prepare): {look['test_checked']} test images checked "
             f"against {look['train_images']} training images as {look['thumbnail_px']}px thumbnails, "
             f"{look['found']} found"]
    print(*lines[-2:], sep="\n", flush=True)
    train = child(Path(__file__), "load_and_train")
    lines.append(f"- training stage: {train['arrays_mib']:.0f} MiB of uint8 train+val arrays loaded in "
                 f"{train['load_seconds']:.1f} s; peak {train['peak_mib']:.0f} MiB including {STEPS} "
                 f"{train['model']} training steps")
    print(lines[-1], flush=True)
    return [f"## {n} images", "", *lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        answer_child(globals(), "step_", args.child)
        return
    sections = [line for n in args.images for line in measure(n)]
    report = "\n".join(["# Scale check", "", f"Measured by `python bench/scale.py --images "
                        f"{' '.join(map(str, args.images))}` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
                        "JPEGs of 96x80 in folders of 10,000 (random images, so no near-duplicates to find), "
                        "prepared to 64x64 and loaded for training; peak memory is each process's max RSS.", "",
                        *sections])
    (REPO / "bench" / "scale.md").write_text(report, encoding="utf-8")
    print(f"wrote {REPO / 'bench' / 'scale.md'}")


if __name__ == "__main__":
    main()
