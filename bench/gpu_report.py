"""bench/gpu.py's last two phases: the MLflow model of each training loaded on the CPU against its best.pt
(and the GPU system metrics its run received), and the results as markdown for bench/results.md."""

from __future__ import annotations

from pathlib import Path

HOMEWORK = {"ae": (28.93, 0.879, 0.092), "vae": (20.35, 0.593, 0.275)}  # its own data: a reference only


def mlflow_checks(models: Path, data: Path, configs: list[str]) -> dict:
    """For each training: its logged MLflow model (runs:/<id>/model) loaded on the CPU, reconstructing 64
    test images as its best.pt does on the CPU; best.pt on the device against the CPU; the run's system/gpu_*
    metrics (MLflow's monitor, through nvidia-ml-py)."""
    import json

    import torch
    from mlflow.tracking import MlflowClient

    from aevae.data.load import load_split
    from aevae.data.tensors import to_unit
    from aevae.inference.load import load_any
    from aevae.machine.device import pick_device
    from aevae.models.checkpoints import load_model

    x = to_unit(load_split(data, "test")[:64])
    device = pick_device("auto")
    rows = {}
    for config in configs:
        folder = models / config / "seed0"
        run_id = json.loads((folder / "run.json").read_text())["run_id"]
        logged, _ = load_any(f"runs:/{run_id}/model", "cpu")
        best = load_model(folder / "best.pt")[0]
        with torch.no_grad():
            on_cpu, from_mlflow = best.reconstruct(x), logged.reconstruct(x)
            on_device = best.to(device).reconstruct(x.to(device)).cpu()
        metrics = MlflowClient().get_run(run_id).data.metrics
        rows[config] = {"run_id": run_id, "mlflow_vs_checkpoint_bitwise": torch.equal(on_cpu, from_mlflow),
                        "mlflow_vs_checkpoint_max_abs_diff": float((on_cpu - from_mlflow).abs().max()),
                        "device_vs_cpu_max_abs_diff": float((on_cpu - on_device).abs().max()),
                        "gpu_system_metrics": sorted(k for k in metrics if k.startswith("system/gpu"))}
    return rows


def _cell(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _header(r: dict) -> list[str]:
    env = r["env"]
    where = (f"{env['device_name']} (compute capability {env['capability']}), CUDA {env['cuda']}, cuDNN {env['cudnn']}"
             if env["device"] == "cuda" else f"NO GPU: {env['device_name']} (a smoke run, not GPU numbers)")
    return ["## GPU (CUDA)", "",
            f"Measured by `python bench/gpu.py` on {env['date']}: {where}; torch {env['torch']}, Python "
            f"{env['python']}, host CPU {env['cpu']} ({env['cpu_cores']} cores). `train.precision: auto` picked "
            f"{env['auto_precision']}; cuDNN's fp32 convolutions: {env['cudnn_conv_fp32']} (torch's default; the "
            "metrics run in ieee).", ""]


def _training(r: dict) -> list[str]:
    t, counts = r["train"], r["prepare"]["counts"]
    lines = [f"### The homework's setting: {t['epochs_asked']} epochs asked, lr 0.002, batch 64, built-in crops "
             f"({counts['train']} train / {counts['val']} val / {counts['test']} test), one seed", "",
             f"`stages/train.py` for the three models **at once** on the one device: {t['total_seconds']} s in all; "
             f"GPU utilisation mean {_cell(t['gpu_util_mean_pct'], 1)} %, max {_cell(t['gpu_util_max_pct'])} %.", "",
             "| model | epochs (this run) | wall s | images/s, start-up included | images/s after epoch 1 | "
             "peak GPU MiB | final val loss |", "|---|---|---|---|---|---|---|"]
    for config, m in t["models"].items():
        stopped = ", stopped at the deadline: state saved" if m["stopped"] else ""
        lines.append(f"| {config} | {m['epochs']} ({m['epochs_this_run']}{stopped}) | {m['seconds']} | "
                     f"{m['images_per_s']} | {_cell(m['steady_images_per_s'], 1)} | {_cell(m['gpu_peak_mib'])} | "
                     f"{m['final_val_loss']:.2f} |")
    return lines + [""]


def _precisions(r: dict) -> list[str]:
    s = r["short"]
    lines = [f"### bf16 against fp32: `stages/train.py`, {s['epochs']} epochs each, one model at a time", "",
             "| model | fp32 images/s after epoch 1 | auto images/s after epoch 1 | auto / fp32 |", "|---|---|---|---|"]
    for config, ratio in s["auto_over_fp32"].items():
        lines.append(f"| {config} | {_cell(s['fp32']['models'][config]['steady_images_per_s'], 1)} | "
                     f"{_cell(s['auto']['models'][config]['steady_images_per_s'], 1)} | {ratio}x |")
    return lines + [""]


def _steps(r: dict) -> list[str]:
    s = r["steps"]
    lines = [f"### The training step and its variants ({s['images']} images, batch 64; weights after the pass "
             "against the pipeline's, an \"again\" row's against the row above)", "",
             "| model | precision | variant | images/s | ms/step | speed-up | weights bitwise | max abs diff |",
             "|---|---|---|---|---|---|---|---|"]
    for config in (c for c in s if c not in ("images", "profile")):
        for precision, rows in s[config].items():
            for row in rows:
                if "error" in row:
                    lines.append(f"| {config} | {precision} | {row['variant']} | failed: {row['error']} | | | | |")
                    continue
                lines.append(f"| {config} | {precision} | {row['variant']} | {row['images_per_s']} | "
                             f"{row['ms_per_step']} | {row['speedup']}x | {row['bitwise']} | "
                             f"{row['max_abs_diff']:.3g} |")
    lines += ["", "Where the pipeline's step spends its time (torch.profiler, one pass):", "",
              "| model | wall ms/step | kernel ms/step | device busy | host waits for the device per step |",
              "|---|---|---|---|---|"]
    for config, p in s["profile"].items():
        lines.append(f"| {config} | {p['wall_ms_per_step']} | {p['kernel_ms_per_step']} | "
                     f"{_cell(p['device_busy_fraction'])} | {_cell(p['host_waits_per_step'])} |")
    return lines + [""]


def _resume(r: dict) -> list[str]:
    lines = ["### Stopped mid-epoch and resumed on the device (VAE)", "",
             "| precision | two uninterrupted runs bitwise | resumed = uninterrupted bitwise | max abs diff |",
             "|---|---|---|---|"]
    for precision, c in r["resume"].items():
        resumed = c["resumed_vs_uninterrupted"]
        lines.append(f"| {precision} | {c['uninterrupted_twice']['bitwise']} | {resumed['bitwise']} "
                     f"| {resumed['max_abs_diff']:.3g} |")
    return lines + [""]


def _evaluation(r: dict) -> list[str]:
    e = r["evaluate"]
    epochs = ", ".join(f"{c} after {n} epochs" for c, n in e["epochs"].items())
    lines = [f"### Test metrics, evaluated on the device ({e['eval']['test_images']} test images; {epochs}; features "
             f"{e['features']['seconds']} s, evaluate {e['evaluate']['seconds']} s)", "",
             "| model | PSNR | SSIM | LPIPS | FID | KID | prior-sample FID | homework (its own data) |",
             "|---|---|---|---|---|---|---|---|"]
    for config in (c for c in ("ae", "ae_code", "vae") if c in e["eval"]):
        m, hw = e["eval"][config], HOMEWORK.get(config)
        lines.append(f"| {config} | {_cell(m.get('psnr'), 2)} | {_cell(m.get('ssim'))} | {_cell(m.get('lpips'))} | "
                     f"{_cell(m.get('fid'), 1)} | {_cell(m.get('kid'), 4)} | {_cell(m.get('sample_fid'), 1)} | "
                     f"{' / '.join(map(str, hw)) if hw else ''} |")
    return lines + ["", "The homework's numbers are a reference on its own data, not a replication.", ""]


def _mlflow(r: dict) -> list[str]:
    lines = ["### Each training's MLflow model, loaded on the CPU", "",
             "| model | = best.pt on the CPU (bitwise) | max abs diff | device vs CPU max abs diff | "
             "system/gpu metrics |",
             "|---|---|---|---|---|"]
    for config, m in r["mlflow"].items():
        if "not_finished" in m:
            lines.append(f"| {config} | training stopped after epoch {m['not_finished']}: no MLflow model yet | | | |")
            continue
        lines.append(f"| {config} | {m['mlflow_vs_checkpoint_bitwise']} | {m['mlflow_vs_checkpoint_max_abs_diff']:.3g} "
                     f"| {m['device_vs_cpu_max_abs_diff']:.3g} | {len(m['gpu_system_metrics'])} |")
    return lines + [""]


def markdown(results: dict) -> str:
    """The results that are there, as bench/results.md's "GPU (CUDA)" section."""
    parts = [("env", _header), ("train", _training), ("short", _precisions), ("steps", _steps),
             ("resume", _resume), ("evaluate", _evaluation), ("mlflow", _mlflow)]
    lines: list[str] = []
    for key, render in parts:
        if key in results and (key != "train" or "prepare" in results):
            lines += render(results)
    return "\n".join(lines) + "\n"
