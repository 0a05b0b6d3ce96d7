"""Benchmark aevae against the plain PyTorch loop of the study's notebook, on this machine, in one run.

    python bench/run.py            # about 35 minutes on a 2-core CPU, most of it the sweep; writes bench/results.md
    python bench/run.py --quick    # smaller sizes, no dvc repro, no sweep (about 4 minutes); results not written

Every figure is measured here, now; each measurement runs in its own process so that its peak memory
(max RSS) is its own. Ratios are ours / baseline, so above 1 means faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import OUT, REPO, answer_child, copy_repo, machine, replace_section, sh
from common import child as run_child
from sweep import SWEEP_HEADING, sweep_section

# --------------------------------------------------------------------------- measurements (child side)


def _train_images(n: int):
    from aevae.data.load import load_split

    return load_split(OUT / "prepared", "train")[:n]


def configurations() -> dict[str, str]:
    """The default study's model configurations (aevae.config.schema.Params().models), name -> the model's label:
    what the training rows measure, every kind the study trains (aevae.models.MODELS) included."""
    from aevae.config.schema import Params
    from aevae.models.registry import build_model

    params = Params()
    return {name: build_model(name, params).label for name in params.models}


def _model_and_optimizer(config: str):
    """The model configuration `config` as the training stage builds it (default params), channels_last,
    with its Adam."""
    import torch

    from aevae.config.schema import Params
    from aevae.models.registry import build_model
    from aevae.train.loop import make_optimizer

    params = Params()
    torch.manual_seed(0)
    model = build_model(config, params).to(memory_format=torch.channels_last)
    return model, make_optimizer(model, lr=params.lr, weight_decay=params.weight_decay)


def measure_train_ours(config: str, n: int, precision: str = "fp32") -> dict:
    """aevae's training epoch: uint8 tensors in memory, channels_last batches."""
    import torch

    from aevae.train.loop import run_epoch

    images = torch.from_numpy(_train_images(n))
    model, optimizer = _model_and_optimizer(config)
    generator = torch.Generator().manual_seed(0)
    step = {"batch_size": 64, "device": torch.device("cpu"), "precision": precision, "optimizer": optimizer,
            "generator": generator}
    run_epoch(model, images[:128], **step)  # warm-up
    start = time.perf_counter()
    run_epoch(model, images, **step)
    return {"images_per_s": len(images) / (time.perf_counter() - start)}


def measure_train_ceiling(config: str, n: int) -> dict:
    """The same step on one batch that never leaves memory: the model's compute alone, no data handling.

    No data pipeline can beat this rate, so ceiling / baseline bounds what any loader can gain here.
    """
    import torch

    from aevae.data.tensors import batches

    model, optimizer = _model_and_optimizer(config)
    model.train()
    x = next(batches(_train_images(64), 64, torch.device("cpu")))

    def step() -> None:
        loss = model.loss(x, epoch=1).value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(), step()  # warm-up
    steps = n // 64
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_s": steps * 64 / (time.perf_counter() - start)}


def measure_precision_quality(config: str, precision: str, n: int, epochs: int) -> dict:
    """Train `config` from the same seed in `precision`, then score the test split in fp32."""
    import torch

    from aevae.data.load import load_split
    from aevae.evaluate.scores import reconstruct_all, score_images
    from aevae.train.loop import run_epoch

    images = torch.from_numpy(_train_images(n))
    model, optimizer = _model_and_optimizer(config)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        run_epoch(model, images, batch_size=64, device=torch.device("cpu"), precision=precision,
                  optimizer=optimizer, generator=generator)
    seconds = time.perf_counter() - start
    test = load_split(OUT / "prepared", "test")
    cpu = torch.device("cpu")
    scores = score_images(reconstruct_all(model, test, 100, cpu), test, 100, None, cpu)
    return {"images_per_s": n * epochs / seconds, "psnr": float(scores.psnr.mean()),
            "ssim": float(scores.ssim.mean()), "test_images": len(test)}


def measure_train_baseline(config: str, n: int) -> dict:
    """The notebook's loop: ImageFolder decoding PNGs every epoch, DataLoader, the same model and Adam."""
    import torch
    import torchvision
    from torch.utils.data import DataLoader, Subset

    from aevae.config.schema import Params
    from aevae.models.registry import build_model

    dataset = torchvision.datasets.ImageFolder(str(OUT / "folder"), transform=torchvision.transforms.ToTensor())
    torch.manual_seed(0)
    model = build_model(config, Params())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002, weight_decay=1e-5)

    def epoch(data) -> None:
        model.train()
        for x, _ in DataLoader(data, batch_size=64, shuffle=True):
            loss = model.loss(x).value  # the same loss as ours; what differs is the data path
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    epoch(Subset(dataset, range(128)))  # warm-up
    data = Subset(dataset, range(n))
    start = time.perf_counter()
    epoch(data)
    return {"images_per_s": n / (time.perf_counter() - start)}


def _eval_images(n: int):
    import numpy as np

    from aevae.data.load import load_split

    test = load_split(OUT / "prepared", "train")[:n]
    rng = np.random.default_rng(0)
    noisy = np.clip(test + rng.normal(0, 12, test.shape), 0, 255).astype(np.uint8)
    return noisy, test


def _lpips_model():
    from aevae.evaluate.lpips import Backbone, LPIPSUnavailable, load_lpips

    try:
        model, source = load_lpips()
        return model, f"real AlexNet weights ({source})"
    except LPIPSUnavailable:
        # Same network, same cost; the values are not LPIPS and are not reported, only timed.
        import torchvision

        features = torchvision.models.alexnet(weights=None).features.state_dict()
        model, _ = load_lpips(backbone=Backbone(features, "random stand-in"))
        return model, "randomly initialised AlexNet (no weights found); timing only"


def measure_eval_ours(n: int) -> dict:
    """aevae's evaluation: PSNR + SSIM + LPIPS on batches of 100, under no_grad."""
    import torch

    from aevae.evaluate.scores import score_images

    pred, target = _eval_images(n)
    model, note = _lpips_model()
    score_images(pred[:100], target[:100], 100, model, torch.device("cpu"))  # warm-up
    start = time.perf_counter()
    score_images(pred, target, 100, model, torch.device("cpu"))
    return {"images_per_s": n / (time.perf_counter() - start), "note": note}


def measure_eval_baseline(n: int) -> dict:
    """A notebook's evaluation: one image at a time through torchmetrics' PSNR, SSIM and LPIPS."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from aevae.data.tensors import to_unit

    pred, target = _eval_images(n)
    model, note = _lpips_model()
    start = time.perf_counter()
    for i in range(n):
        p, t = to_unit(pred[i: i + 1]), to_unit(target[i: i + 1])
        peak_signal_noise_ratio(p, t, data_range=1.0)
        structural_similarity_index_measure(p, t, data_range=1.0)
        model(p, t, normalize=True)
    return {"images_per_s": n / (time.perf_counter() - start), "note": note}


def _inception_and_images(n: int):
    from aevae.evaluate.inception import find_inception

    images = _eval_images(n)[1]
    return find_inception(download=False), images


def measure_inception_ours(n: int) -> dict:
    """aevae's Inception feature extraction (FID/KID): batched (8 on a CPU) under inference_mode."""
    import torch

    inception, images = _inception_and_images(n)
    inception.features(images[:2], torch.device("cpu"))  # warm-up
    start = time.perf_counter()
    inception.features(images, torch.device("cpu"))
    return {"images_per_s": n / (time.perf_counter() - start), "note": inception.source}


def measure_inception_baseline(n: int) -> dict:
    """A notebook's extraction: the same network and preprocessing, one image at a time, under no_grad."""
    import torch

    from aevae.evaluate.inception import stylegan3_input

    inception, images = _inception_and_images(n)
    net = inception.net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for image in images:
            net.script(stylegan3_input(torch.as_tensor(image[None]).permute(0, 3, 1, 2)))
    return {"images_per_s": n / (time.perf_counter() - start), "note": inception.source}


def measure_prepare_ours(n: int) -> dict:
    from aevae.data.params import DataParams
    from aevae.data.prepare import prepare

    start = time.perf_counter()
    prepare(DataParams(source="folder", path=str(OUT / "jpegs")), seed=0, out=OUT / "prepared_jpegs")
    return {"images_per_s": n / (time.perf_counter() - start)}


def measure_prepare_baseline(n: int) -> dict:
    """Open, convert, resize each file with PIL and stack in memory, as a notebook would."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    images = [np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
              for p in sorted((OUT / "jpegs").iterdir())]
    np.save(OUT / "baseline_prepared.npy", np.stack(images))
    return {"images_per_s": n / (time.perf_counter() - start)}


def measure_noop_repro() -> dict:
    """`dvc repro` when everything is cached, in the repository copy the full run made."""
    start = time.perf_counter()
    out = subprocess.run(["dvc", "repro"], cwd=OUT / "repo", capture_output=True, text=True, check=True)
    assert "up to date" in out.stdout, out.stdout
    return {"seconds": time.perf_counter() - start}


def measure_import_time() -> dict:
    """Wall time from interpreter start to a stage's --help (what a cached stage would pay)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "stages/train.py"), "--help"], check=True, capture_output=True)
    return {"seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- orchestration (parent side)


def child(name: str, *args: str) -> dict:
    """Run the measurement `measure_<name>` in a fresh process: its result and its peak RSS (common.child)."""
    return run_child(Path(__file__), name, *args)


def setup(n_train: int, n_jpegs: int) -> None:
    import numpy as np
    from PIL import Image

    from aevae.data.load import load_split
    from aevae.data.params import DataParams
    from aevae.data.prepare import prepare

    OUT.mkdir(parents=True, exist_ok=True)
    prepare(DataParams(builtin_size=max(n_train * 10 // 8 + 10, 300)), seed=0, out=OUT / "prepared")
    folder = OUT / "folder" / "all"
    shutil.rmtree(OUT / "folder", ignore_errors=True)
    folder.mkdir(parents=True)
    for i, image in enumerate(load_split(OUT / "prepared", "train")[:n_train]):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    jpegs = OUT / "jpegs"
    shutil.rmtree(jpegs, ignore_errors=True)
    jpegs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_jpegs):  # camera-like sizes: decoding them is what prepare pays for
        small = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC).save(jpegs / f"{i:05d}.jpg", quality=90)


def full_repro() -> dict:
    """The default `dvc repro` in a fresh copy of the repository (the main command's work)."""
    repo = OUT / "repo"
    copy_repo(repo)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit("the default dvc repro failed in the benchmark copy")
    # ru_maxrss of a waited child is the largest of its process tree: the heaviest stage.
    return {"seconds": time.perf_counter() - start, "peak_mib": usage.ru_maxrss / 1024}


FID_HEADING = "## FID and KID"


def fid_section(n: int = 100) -> str:
    """The Inception extractor's rate (ours vs one image at a time), and what eval.fid costs a pipeline:
    features + evaluate + report with FID on and off, on the default data with 1-epoch models."""
    setup(256, 0)
    ours, base = child("inception_ours", str(n)), child("inception_baseline", str(n))
    repo = OUT / "fid-repo"
    copy_repo(repo)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"],
                ["dvc", "exp", "run", "-S", "epochs=1"]):
        sh(cmd, repo, env)
    seconds = {}
    for setting in ("true", "false"):  # both differ from the workspace's auto: features, evaluate, report rerun
        start = time.perf_counter()
        sh(["dvc", "exp", "run", "--temp", "-S", "epochs=1", "-S", f"eval.fid={setting}"], repo, env)
        seconds[setting] = time.perf_counter() - start
    test_images = json.loads((repo / "metrics/eval.json").read_text())["test_images"]
    return "\n".join([
        FID_HEADING, "",
        f"Measured by `python bench/run.py --fid-only` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
        "| what | ours (images/s) | baseline (images/s) | ours / baseline | peak MiB ours / baseline | weights |",
        "|---|---|---|---|---|---|",
        f"| Inception-v3 features, {n} images 64x64 -> 299x299 | {ours['images_per_s']:.2f} | "
        f"{base['images_per_s']:.2f} | {ours['images_per_s'] / base['images_per_s']:.2f}x | "
        f"{ours['peak_mib']:.0f} / {base['peak_mib']:.0f} | {ours['note']} |", "",
        "Baseline: the same TorchScript and preprocessing, one image at a time. Pipeline cost: "
        f"`dvc exp run --temp -S eval.fid=true` took {seconds['true']:.0f} s and `-S eval.fid=false` "
        f"{seconds['false']:.0f} s (features, evaluate and report rerun; trainings restored; default data, "
        f"{test_images} test images, three models, one seed): FID and KID add "
        f"{seconds['true'] - seconds['false']:.0f} s.",
        ""])


LIKELIHOOD_HEADING = "## Likelihood"


def likelihood_section(ks: tuple[int, ...] = (0, 64, 100, 1000)) -> str:
    """What the likelihood evaluation (bits/dim and the posterior's use, aevae.evaluate.likelihood) adds to a
    pipeline: evaluate + report at eval.iwae_samples 0 (off), 64 (the default), 100 and 1,000, trainings restored,
    on the default data with 1-epoch models (the likelihood's cost does not depend on the epochs)."""
    repo = OUT / "likelihood-repo"
    copy_repo(repo)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"],
                ["dvc", "exp", "run", "-S", "epochs=1", "-S", "eval.iwae_samples=1"]):
        sh(cmd, repo, env)
    seconds, bpd = {}, {}
    for k in ks:  # each differs from the last run's k: evaluate and report rerun, nothing else
        start = time.perf_counter()
        sh(["dvc", "exp", "run", "-S", "epochs=1", "-S", f"eval.iwae_samples={k}"], repo, env)
        seconds[k] = time.perf_counter() - start
        bpd[k] = json.loads((repo / "metrics/eval.json").read_text())["vae"].get("bpd")
    result = json.loads((repo / "metrics/eval.json").read_text())
    rows = [f"| {k:,} | {seconds[k]:.0f} | {seconds[k] - seconds[ks[0]]:+.0f} | "
            f"{'off' if bpd[k] is None else f'{bpd[k]:.4f}'} |" for k in ks]
    return "\n".join([
        LIKELIHOOD_HEADING, "",
        f"Measured by `python bench/run.py --likelihood-only` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
        f"`dvc exp run -S epochs=1 -S eval.iwae_samples=k`, one k after the other: evaluate and report rerun, "
        f"trainings restored; default data, {result['test_images']} test images, the default study (one model "
        "with an ELBO, the VAE, at 1 epoch: the likelihood's cost does not depend on the epochs). k = 0 turns the "
        "likelihood off.", "",
        "| k (eval.iwae_samples) | evaluate + report (s) | added by the likelihood (s) | VAE bits/dim (IWAE) |",
        "|---|---|---|---|", *rows, ""])


PRECISION_HEADING = "## Precision"


def precision_section(n: int = 1024) -> str:
    """Our training epoch in fp32 and in bf16 autocast on this CPU, and what `train.precision: auto` picks."""
    import torch

    from aevae.machine.device import pick_precision

    setup(n, 0)
    rows = ["| model | fp32 (images/s) | bf16 (images/s) | bf16 / fp32 |", "|---|---|---|---|"]
    for config, label in configurations().items():
        fp32, bf16 = (child("train_ours", config, str(n), p)["images_per_s"] for p in ("fp32", "bf16"))
        rows.append(f"| {label} | {fp32:.1f} | {bf16:.1f} | {bf16 / fp32:.2f}x |")
        print(f"  {rows[-1]}", flush=True)
    return "\n".join([
        PRECISION_HEADING, "",
        f"Measured by `python bench/run.py --precision-only` on {time.strftime('%Y-%m-%d')}: {machine()}; "
        f"`train.precision: auto` picks {pick_precision('auto', torch.device('cpu'))} here.", "",
        f"Our training epoch (batch 64, {n} images) in each precision, same seed and data.", "", *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, no full dvc repro, no results.md")
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the sweep section (about 25 minutes): replaces that section of results.md")
    parser.add_argument("--precision-only", action="store_true",
                        help="only the fp32 / bf16 training rates of this CPU (about 2 minutes): replaces that "
                             "section of results.md")
    parser.add_argument("--fid-only", action="store_true",
                        help="only the Inception extractor's rate and the pipeline cost of eval.fid (about 8 "
                             "minutes): replaces that section of results.md")
    parser.add_argument("--likelihood-only", action="store_true",
                        help="only what the likelihood evaluation adds to evaluate at eval.iwae_samples 0, 64, 100 and "
                             "1,000 (about 17 minutes): replaces that section of results.md")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # dvc and the stages' `python` must be this interpreter's, also when its venv is not activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if args.child:
        answer_child(globals(), "measure_", args.child)
        return

    results = REPO / "bench" / "results.md"
    for only, heading, make in ((args.sweep_only, SWEEP_HEADING, sweep_section),
                                (args.precision_only, PRECISION_HEADING, precision_section),
                                (args.fid_only, FID_HEADING, fid_section),
                                (args.likelihood_only, LIKELIHOOD_HEADING, likelihood_section)):
        if only:
            section = make()
            print("\n" + section)
            old = results.read_text(encoding="utf-8") if results.exists() else "# Benchmark results\n"
            results.write_text(replace_section(old, heading, section), encoding="utf-8")
            print(f"wrote the section {heading!r} of {results}")
            return

    n_train, n_eval, n_jpegs = (256, 200, 200) if args.quick else (1024, 1000, 1000)
    print(f"setting up {n_train} training images, {n_jpegs} JPEGs in {OUT} ...", flush=True)
    setup(n_train, n_jpegs)
    rows = []

    def compare(what: str, ours: dict, base: dict) -> None:
        rows.append((what, f"{ours['images_per_s']:.1f}", f"{base['images_per_s']:.1f}",
                     f"{ours['images_per_s'] / base['images_per_s']:.2f}x",
                     f"{ours['peak_mib']:.0f} / {base['peak_mib']:.0f}", ours.get("note", "")))
        print(f"  {rows[-1]}", flush=True)

    configs = configurations()
    baselines = {}
    for config, label in configs.items():
        ours = child("train_ours", config, str(n_train))
        baselines[config] = child("train_baseline", config, str(n_train))
        compare(f"train {label} (fp32, batch 64, {n_train} images)", ours, baselines[config])
    ceilings = {config: child("train_ceiling", config, str(n_train)) for config in configs}
    # bf16 is slow on CPUs without native bf16 instructions, so its run is short: same seed, same
    # images, same epochs in both precisions, then the test split scored in fp32.
    n_q, epochs_q = (64, 1) if args.quick else (256, 2)
    quality, quality_label = next(iter(configs.items()))  # the study's first configuration, its AE
    fp32, bf16 = (child("precision_quality", quality, p, str(n_q), str(epochs_q)) for p in ("fp32", "bf16"))
    compare(f"train {quality_label}, train.precision bf16 vs fp32, ours ({n_q} images x {epochs_q} epochs)", bf16, fp32)
    compare(f"evaluate PSNR+SSIM+LPIPS ({n_eval} images)", child("eval_ours", str(n_eval)),
            child("eval_baseline", str(n_eval)))
    compare(f"prepare {n_jpegs} JPEGs 640x480 -> 64x64", child("prepare_ours", str(n_jpegs)),
            child("prepare_baseline", str(n_jpegs)))
    table = ["| what | ours (images/s) | baseline (images/s) | ours / baseline | peak MiB ours / baseline | note |",
             "|---|---|---|---|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    timings = [
        *(f"- compute ceiling, train {configs[config]}: the same step on one resident batch runs "
          f"{c['images_per_s']:.1f} images/s, {c['images_per_s'] / baselines[config]['images_per_s']:.2f}x the "
          "baseline: the most any data pipeline can gain over it on this machine" for config, c in ceilings.items()),
        f"- bf16 quality: {quality_label} after {epochs_q} epochs on {n_q} images, test split "
        f"({fp32['test_images']} images): PSNR {fp32['psnr']:.2f} fp32 / {bf16['psnr']:.2f} bf16, "
        f"SSIM {fp32['ssim']:.4f} / {bf16['ssim']:.4f}",
        f"- stage import + `--help` (`stages/train.py`): {child('import_time')['seconds']:.2f} s"]
    if not args.quick:
        print("running the default dvc repro in a copy (about 5 minutes) ...", flush=True)
        full = full_repro()
        noop = child("noop_repro")
        timings += [f"- default `dvc repro` from scratch: {full['seconds']:.0f} s "
                    f"(peak {full['peak_mib']:.0f} MiB, heaviest process)",
                    f"- no-op `dvc repro` (everything cached): {noop['seconds']:.2f} s "
                    f"(peak {noop['peak_mib']:.0f} MiB)"]
    report = "\n".join([
        "# Benchmark results", "",
        f"Measured by `python bench/run.py` on {time.strftime('%Y-%m-%d')}: {machine()}.", "",
        "Baseline: the study's notebook style, same model, optimizer and batch size: torchvision ImageFolder "
        "decoding PNG files every epoch through a DataLoader; evaluation one image at a time; preparation "
        "with a plain PIL loop into memory.", "", *table, "", *timings, ""])
    if not args.quick:
        print("running the sweep four times (about 25 minutes) ...", flush=True)
        report += "\n" + sweep_section()
    print("\n" + report)
    if not args.quick:
        results.write_text(report, encoding="utf-8")
        print(f"wrote {results}")


if __name__ == "__main__":
    main()
