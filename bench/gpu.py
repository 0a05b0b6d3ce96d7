"""The CUDA path, proven on a GPU through the project's own code: the homework's setting (200 epochs, lr
0.002, batch 64, 20,000 built-in crops) for the AE, the AE at the VAE's code size and the VAE, timed; where
a step's time goes; evaluation on CUDA with the real LPIPS and Inception weights; the MLflow model of a
CUDA training loaded on the CPU.

    python bench/gpu.py --out bench/out/gpu                 # on a CUDA machine (training shortens to fit --deadline)
    python bench/gpu.py --smoke --out bench/out/gpu-smoke   # anywhere: tiny data, 1 epoch, the same code path
    python bench/gpu.py --out bench/out/gpu --results       # also write its section of bench/results.md

Phases (--phases, in this order; each adds to <out>/gpu.json, so a later call can go on where one ended):
  env       torch, CUDA, the device, bf16 support, the precision train.precision: auto picks
  prepare   stages/prepare.py on the built-in photographs (data.builtin_size crops)
  steps     the pipeline's training step and its variants (data resident on the device, fused Adam,
            torch.compile), timed, each one's fp32 weights against the pipeline's; torch.profiler's split
  resume    a VAE stopped mid-epoch and resumed from last.pt, against the same training uninterrupted
  short     stages/train.py for a few epochs per model, fp32 and bf16, one at a time: images/s each
  train     stages/train.py for every model at the full setting, all at once on the one device
  evaluate  stages/features.py and stages/evaluate.py: PSNR, SSIM, LPIPS, FID, KID
  mlflow    each training's MLflow model loaded on the CPU against its best.pt; its GPU system metrics
  write     <out>/gpu.md (and with --results, the "GPU (CUDA)" section of bench/results.md)

The stages run as their own processes on an MLflow sqlite store in <out>, without dvc (the stage scripts
are what dvc.yaml runs). How to bring what a bare GPU machine lacks: docs/performance.md, "On a GPU".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from common import REPO, replace_section
from gpu_report import markdown

PHASES = ["env", "prepare", "steps", "resume", "short", "train", "evaluate", "mlflow", "write"]
AFTER_TRAIN_S = 180  # what the train phase leaves of --deadline when evaluate, mlflow and write follow it
CONFIGS = ["ae", "ae_code", "vae"]  # the homework's AE, the AE at the VAE's code size (AE-128), the VAE
# Missing LPIPS or Inception weights are an error here, not an "n/a" in the table.
FULL = {"epochs": 200, "lr": 0.002, "batch_size": 64, "data": {"builtin_size": 20000}, "train": {"seeds": [0]},
        "tune": {"trials": 0}, "eval": {"fid": "auto", "require_lpips": True, "require_fid": True}}
# The smoke run: the same code path at a quarter of the pixels and 10 test images (Inception's cost is per image),
# so that tests/test_gpu_bench.py runs it in about a minute on 2 cores.
SMOKE = {**FULL, "epochs": 1, "data": {"builtin_size": 200, "image_size": 32, "test_fraction": 0.05},
         "eval": {"fid": True, "require_lpips": True, "require_fid": True, "bootstrap_samples": 200}}


class Bench:
    """The run's settings, its folder and what it has measured so far (<out>/gpu.json)."""

    def __init__(self, out: Path, smoke: bool, short_epochs: int, deadline: float, compile_too: bool) -> None:
        self.out, self.smoke, self.short_epochs, self.compile_too = out, smoke, short_epochs, compile_too
        self.deadline = deadline
        self.epochs: int | None = None  # --epochs: the train phase's, instead of the setting's
        self.evaluates_after_training = True  # whether this command's phases go on after train
        self.file = out / "gpu.json"
        self.results: dict = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.data = out / "data"

    def save(self, phase: str, result: object) -> None:
        self.results[phase] = result
        self.file.write_text(json.dumps(self.results, indent=2) + "\n", encoding="utf-8")
        print(f"gpu bench: {phase}: {json.dumps(result)[:600]}", flush=True)

    def params_file(self, name: str, **overrides: object) -> Path:
        """params.yaml of this checkout with the bench's setting (and `overrides`) on top, in <out>."""
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        for layer in (SMOKE if self.smoke else FULL, overrides):
            for key, value in layer.items():
                if isinstance(value, dict):
                    params.setdefault(key, {}).update(value)
                else:
                    params[key] = value
        params["models"] = {name: params["models"][name] for name in CONFIGS}
        path = self.out / f"params-{name}.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        return path

    def stage(self, script: str, *args: str) -> subprocess.Popen:
        """A stage script of this checkout as its own process, on the bench's MLflow store (cwd: <out>)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "MLFLOW_TRACKING_URI": f"sqlite:///{self.out / 'mlflow.db'}", "TQDM_DISABLE": "1"}
        proc = subprocess.Popen([sys.executable, str(REPO / "stages" / script), *args], cwd=self.out, env=env)
        proc.started = time.monotonic()  # type: ignore[attr-defined] - its wall time counts from here
        return proc

    def needs(self, phase: str) -> dict:
        """What an earlier phase measured, or SystemExit naming it (this --out has no such phase yet)."""
        if phase not in self.results:
            raise SystemExit(f"gpu bench: {self.file} has no {phase} phase yet: run --phases {phase} first "
                             "(into the same --out)")
        return self.results[phase]

    def left(self) -> float:
        return self.deadline - time.monotonic()


def wait(procs: dict[str, subprocess.Popen], stop_at: float | None = None,
         epochs: Callable[[str], int] = lambda name: 0) -> dict[str, dict]:
    """Wait for stages' processes: each one's wall time from its start, its peak host memory (max RSS) and,
    for a training, when each of its `epochs` (done so far) ended. At `stop_at` each training still running
    that has ended an epoch (its stop handler is in place) gets SIGUSR1, the signal Slurm sends ahead of a
    time limit: it saves its state after the batch it is in and exits 130 (aevae.train.stop), and a later run
    of the stage resumes it. Any other failure is a SystemExit."""
    rows: dict[str, dict] = {}
    signalled: set[str] = set()
    ended: dict[str, dict[int, float]] = {name: {} for name in procs}
    while len(rows) < len(procs):
        for name in procs:
            ended[name].setdefault(epochs(name), time.monotonic())
        for name, proc in procs.items():
            if name in rows:
                continue
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                if code != 0 and not (code == 130 and name in signalled):
                    raise SystemExit(f"gpu bench: {name} failed (exit {code}); its log is above")
                rows[name] = {"seconds": round(time.monotonic() - proc.started, 1),
                              "host_peak_mib": round(usage.ru_maxrss / 1024), "stopped": name in signalled,
                              "steady_epoch_s": _steady_epoch(ended[name])}
            elif stop_at is not None and time.monotonic() >= stop_at and name not in signalled and len(ended[name]) > 1:
                print(f"gpu bench: the deadline is near: SIGUSR1 to {name}", flush=True)
                proc.send_signal(signal.SIGUSR1)
                signalled.add(name)
        time.sleep(0.05)
    return rows


def _steady_epoch(ended: dict[int, float]) -> float | None:
    """Seconds per epoch after the first one this run saw end (the first holds start-up and warm-up)."""
    counts = sorted(ended)[1:]  # [0]: what was done when the process started
    if len(counts) < 2:
        return None
    return round((ended[counts[-1]] - ended[counts[0]]) / (counts[-1] - counts[0]), 3)


class GpuSampler(threading.Thread):
    """NVML's view every 0.2 s while a phase runs: the GPU's utilisation and each process's memory."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.busy: list[int] = []
        self.process_mib: dict[int, float] = {}
        self.stopped = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVIDIA driver (a CPU smoke run): nothing to sample
            self.nvml = None

    def run(self) -> None:
        while self.nvml and not self.stopped.wait(0.2):
            self.busy.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                used = (proc.usedGpuMemory or 0) / 2**20
                self.process_mib[proc.pid] = max(self.process_mib.get(proc.pid, 0.0), used)

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join()

    def utilisation(self) -> dict:
        if not self.busy:
            return {"gpu_util_mean_pct": None, "gpu_util_max_pct": None}
        return {"gpu_util_mean_pct": round(sum(self.busy) / len(self.busy), 1), "gpu_util_max_pct": max(self.busy)}


# --------------------------------------------------------------------------------------------- phases


def phase_env(bench: Bench) -> dict:
    import torch

    from aevae.machine.device import cpu_isa, pick_device, pick_precision

    device = pick_device("auto")
    cuda = device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else f"cpu ({cpu_isa()})",
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
            "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
            "auto_precision": pick_precision("auto", device), "cpu": cpu_isa(), "cpu_cores": os.cpu_count(),
            "cudnn_conv_fp32": torch.backends.cudnn.conv.fp32_precision,  # "tf32": torch's default
            "date": time.strftime("%Y-%m-%d")}


def phase_prepare(bench: Bench) -> dict:
    proc = bench.stage("prepare.py", "--params", str(bench.params_file("full")), "--out", str(bench.data))
    timing = wait({"stages/prepare.py": proc})["stages/prepare.py"]
    manifest = json.loads((bench.data / "manifest.json").read_text())
    return {**timing, "counts": manifest.get("counts")}


def _data_and_params(bench: Bench):
    import torch

    from aevae.config.load import load_params
    from aevae.train.stage import load_training_data

    params = load_params(bench.params_file("full"))
    train_x, val_x, _ = load_training_data(bench.data, params.data.image_size)
    return params, train_x, val_x, torch


def phase_steps(bench: Bench) -> dict:
    bench.needs("prepare")
    from gpu_steps import profile_steps, variants

    from aevae.machine.device import pick_device, pick_precision

    params, train_x, _, torch = _data_and_params(bench)
    device = pick_device("auto")
    images = train_x[: 64 if bench.smoke else 4096]  # smoke: one batch a pass (and its warm-up)
    result: dict = {"images": len(images)}
    for config in CONFIGS:
        compile_too = bench.compile_too and config == CONFIGS[0]  # it compiles for a minute: the first model only
        result[config] = {"fp32": variants(config, params, images, device, "fp32", compile_too)}
        if pick_precision("auto", device) == "bf16":
            result[config]["bf16"] = variants(config, params, images, device, "bf16", False)
    result["profile"] = {config: profile_steps(config, params, images, device, pick_precision("auto", device),
                                               bench.out / f"profile-{config}.txt") for config in ("ae", "vae")}
    return result


def phase_resume(bench: Bench) -> dict:
    bench.needs("prepare")
    from gpu_steps import resume_check

    from aevae.machine.device import pick_device, pick_precision

    params, train_x, val_x, _ = _data_and_params(bench)
    device = pick_device("auto")
    n = 256 if bench.smoke else 2048
    data = (train_x[:n], val_x[: n // 4])
    return {precision: resume_check("vae", params, data, device, precision, bench.out / f"resume-{precision}")
            for precision in dict.fromkeys(["fp32", pick_precision("auto", device)])}


def _epochs_done(history: Path) -> int:
    return len(history.read_text().splitlines()) - 1 if history.exists() else 0


def _trainings(bench: Bench, name: str, configs: list[str], params: Path, together: bool,
               stop_at: float | None = None) -> dict:
    """stages/train.py for each of `configs` (all at once when `together`), as dvc.yaml runs it; stopped at
    `stop_at` and resumed by the next run of the phase (a call of its own), as a Slurm job would be."""
    models = bench.out / f"models-{name}"
    history = {config: models / config / "seed0" / "history.csv" for config in configs}
    before = {config: _epochs_done(history[config]) for config in configs}
    rows, procs = {}, {}
    with GpuSampler() as sampler:
        start = time.monotonic()
        for config in configs:
            procs[config] = bench.stage("train.py", "--model", config, "--seed", "0", "--params", str(params),
                                        "--data", str(bench.data), "--models", str(models))
            if not together:
                rows.update(wait({config: procs[config]}, stop_at, lambda c: _epochs_done(history[c])))
        if together:
            rows.update(wait(procs, stop_at, lambda c: _epochs_done(history[c])))
        total = round(time.monotonic() - start, 1)
    settings = yaml.safe_load(params.read_text())
    n_train = json.loads((bench.data / "manifest.json").read_text())["counts"]["train"]
    for config, proc in procs.items():
        lines = history[config].read_text().splitlines()
        done = len(lines) - 1
        rows[config].update({"epochs": done, "epochs_this_run": done - before[config],
                             "images_per_s": round((done - before[config]) * n_train / rows[config]["seconds"], 1),
                             "steady_images_per_s": round(n_train / steady, 1) if (steady := rows[config][
                                 "steady_epoch_s"]) else None,
                             "gpu_peak_mib": round(sampler.process_mib.get(proc.pid, 0)) or None,
                             "final_val_loss": float(lines[-1].split(",")[header_index(lines[0], "val_loss")])})
    return {"together": together, "total_seconds": total, "precision": settings["train"].get("precision", "auto"),
            "models_dir": models.name, **sampler.utilisation(), "models": {c: rows[c] for c in configs}}


def header_index(header: str, column: str) -> int:
    return header.split(",").index(column)


def phase_short(bench: Bench) -> dict:
    epochs = 1 if bench.smoke else bench.short_epochs
    runs = {precision: _trainings(bench, f"short-{precision}", CONFIGS,
                                  bench.params_file(f"short-{precision}", epochs=epochs,
                                                    train={"seeds": [0], "precision": precision}), together=False)
            for precision in ("fp32", "auto")}
    rate = "images_per_s" if bench.smoke else "steady_images_per_s"  # a smoke run's one epoch has no steady pace
    ratios = {c: round(runs["auto"]["models"][c][rate] / runs["fp32"]["models"][c][rate], 3) for c in CONFIGS}
    return {"epochs": epochs, **runs, "auto_over_fp32": ratios}


def phase_train(bench: Bench) -> dict:
    """All three at the full setting, at once. Trainings still running when --deadline nears (less the
    time the phases after it in this command need) are stopped with SIGUSR1 and keep their state: the
    next run of this phase resumes them where they stopped, as a requeued Slurm job would."""
    epochs = bench.epochs or (SMOKE if bench.smoke else FULL)["epochs"]
    reserve = AFTER_TRAIN_S if bench.evaluates_after_training else 15
    result = _trainings(bench, "full", CONFIGS, bench.params_file("full", epochs=epochs), together=True,
                        stop_at=bench.deadline - reserve)
    return {"epochs_asked": epochs, **result}


def phase_evaluate(bench: Bench) -> dict:
    trained = bench.needs("train")
    models, epochs = bench.out / trained["models_dir"], trained["models"][CONFIGS[0]]["epochs"]
    params = str(bench.params_file("full", epochs=epochs))
    features = wait({"features": bench.stage("features.py", "--params", params, "--data", str(bench.data), "--out",
                                             str(bench.out / "metrics" / "inception" / "test"))})["features"]
    scored = wait({"evaluate": bench.stage("evaluate.py", "--params", params, "--data", str(bench.data), "--models",
                                           str(models), "--out", str(bench.out / "metrics"))})["evaluate"]
    result = json.loads((bench.out / "metrics" / "eval.json").read_text())
    return {"features": features, "evaluate": scored, "eval": result,
            "epochs": {c: m["epochs"] for c, m in trained["models"].items()}}  # what was evaluated


def phase_mlflow(bench: Bench) -> dict:
    from gpu_report import mlflow_checks

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{bench.out / 'mlflow.db'}"
    os.chdir(bench.out)
    trained = bench.needs("train")
    # A training stopped at the deadline has no MLflow model until it ends (the next --phases train).
    finished = [c for c in CONFIGS if not trained["models"][c]["stopped"]]
    checks = mlflow_checks(bench.out / trained["models_dir"], bench.data, finished)
    return {**checks, **{c: {"not_finished": trained["models"][c]["epochs"]} for c in CONFIGS if c not in finished}}


def phase_write(bench: Bench, results_md: bool) -> dict:
    text = markdown(bench.results)
    (bench.out / "gpu.md").write_text(text, encoding="utf-8")
    if results_md:
        if bench.smoke or bench.results["env"]["device"] != "cuda":
            raise SystemExit("gpu bench: --results takes a full run on a CUDA device, not a smoke or CPU run")
        path = REPO / "bench" / "results.md"
        path.write_text(replace_section(path.read_text(encoding="utf-8"), "## GPU (CUDA)", text), encoding="utf-8")
    return {"written": [str(bench.out / "gpu.md")] + (["bench/results.md"] if results_md else [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu", help="the bench's folder")
    parser.add_argument("--smoke", action="store_true", help="tiny data, 1 epoch, the same code path (any machine)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {','.join(PHASES)}")
    parser.add_argument("--short-epochs", type=int, default=5, help="epochs of each short fp32/bf16 run")
    parser.add_argument("--epochs", type=int, help="the train phase's epochs (default: 200, --smoke: 1)")
    parser.add_argument("--deadline", type=float, default=570.0,
                        help="seconds this command may run: trainings still running near it are stopped (SIGUSR1) "
                             "with their state saved, and the next --phases train resumes them")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it compiles)")
    parser.add_argument("--results", action="store_true", help="write the GPU (CUDA) section of bench/results.md")
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the in-process phases' bars; the stages log their epochs
    phases = args.phases.split(",")
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}: choose from {', '.join(PHASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.out.resolve(), args.smoke, args.short_epochs, time.monotonic() + args.deadline,
                  not args.no_compile and not args.smoke)
    bench.epochs, bench.evaluates_after_training = args.epochs, "evaluate" in phases
    for phase in (p for p in PHASES if p in phases):
        if phase == "write":
            bench.save(phase, phase_write(bench, args.results))
        else:
            bench.save(phase, globals()[f"phase_{phase}"](bench))


if __name__ == "__main__":
    main()
