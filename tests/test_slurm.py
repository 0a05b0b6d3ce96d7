"""`aevae slurm`: the study's trainings as jobs of a real one-node Slurm cluster, gathered through a DVC
remote's run-cache into one DVC experiment that equals a local `dvc repro` of the same commit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.conftest import TINY, copy_project, exp_metrics, merged, run

# The VAE at two seeds, one thread per training: Slurm runs both at once on two cores, and a local
# `dvc repro` of the same commit must give the same numbers. (One configuration keeps CI short; the array
# has a task per stage whatever their number, as the dry run's four stages show.)
STUDY = merged(TINY, {"train": {"seeds": [0, 1], "threads": 1}})
CONFIGS = ("vae",)


def study_project(root: Path, env: dict[str, str], configs: tuple[str, ...] = CONFIGS) -> Path:
    """A committed tiny study with a DVC remote (a folder: on a cluster, a shared path or a URL)."""
    repo = copy_project(root / "repo", STUDY)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"] = {name: params["models"][name] for name in configs}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo, env)
    run(["dvc", "remote", "add", "-d", "storage", str(root / "dvc-remote")], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "a two-seed study"], repo, env)
    return repo


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def aevae(args: list[str], repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from aevae.commands import main; main()", *args], cwd=repo,
                          env=env, capture_output=True, text=True)


def test_without_sbatch_the_command_says_so_in_one_line(tmp_path, env):
    no_slurm = {**env, "PATH": str(Path(sys.executable).parent)}  # this Python, no Slurm client
    result = aevae(["slurm", "submit"], tmp_path, no_slurm)
    assert result.returncode == 1 and result.stderr.startswith("Error: sbatch not found")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_dry_run_prints_the_scripts_and_refuses_what_jobs_could_not_see(tmp_path, env):
    repo = study_project(tmp_path, env, ("ae", "vae"))
    result = aevae(["slurm", "submit", "--dry-run", "--gpus", "1", "--time", "02:00:00", "--name", "s"], repo, env)
    assert result.returncode == 0, result.stderr
    scripts = result.stdout
    assert scripts.count("#!/bin/bash") == 3 and "--gres=gpu:1" in scripts and "--time=02:00:00" in scripts
    assert "stages=(train@ae-0 train@ae-1 train@vae-0 train@vae-1)" in scripts
    assert 'dvc repro --pull "$stage"' in scripts and "dvc exp run --pull -n s" in scripts
    assert not (repo / ".dvc/tmp/slurm").exists()  # nothing written, nothing submitted
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    result = aevae(["slurm", "submit", "--dry-run"], repo, env)
    assert result.returncode == 1 and "uncommitted changes (params.yaml)" in result.stderr
    run(["git", "checkout", "params.yaml"], repo, env)
    run(["dvc", "remote", "default", "--unset"], repo, env)
    run(["git", "commit", "-qam", "no default remote"], repo, env)
    result = aevae(["slurm", "submit", "--dry-run"], repo, env)
    assert result.returncode == 1 and "no default DVC remote in the commit's .dvc/config" in result.stderr


def training_runs(store: str) -> list[tuple[str, int]]:
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["aevae"])
    trainings = runs[runs["tags.aevae_role"] == "stage"].dropna(subset=["tags.model_config"])
    return sorted(zip(trainings["tags.model_config"], trainings["params.train.seed"].astype(int)))


@pytest.mark.slow
def test_a_study_on_slurm_equals_a_local_repro_and_never_trains_twice(slurm_cluster, tmp_path, env):
    repo = study_project(tmp_path, env)
    env = {**env, "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    # The same commit, reproduced locally in a clone with its own cache and store, for the reference numbers.
    local = tmp_path / "local"
    run(["git", "clone", "-q", str(repo), str(local)], tmp_path, env)
    start = time.monotonic()
    run(["dvc", "repro"], local, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'local.db'}"})
    local_seconds = time.monotonic() - start
    reference = json.loads((local / "metrics/eval.json").read_text())

    workdir = tmp_path / "studies"
    start = time.monotonic()
    result = aevae(["slurm", "submit", "--name", "first", "--workdir", str(workdir), "--wait"], repo, env)
    slurm_seconds = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"tiny study: local dvc repro {local_seconds:.0f} s, on the one-node Slurm cluster {slurm_seconds:.0f} s")

    # Each training ran as its own Slurm job: one task of the array, seen in the controller's job records.
    study = json.loads((workdir / "first/study.json").read_text())
    records = slurm_cluster.job_records()
    tasks = {int(r["ArrayTaskId"]): r for r in records if r.get("ArrayJobId") == study["jobs"]["train"]}
    assert study["trainings"] == ["train@vae-0", "train@vae-1"] and sorted(tasks) == [0, 1]
    assert all(r["JobState"] == "COMPLETED" and r["Name"] == "aevae-train" for r in tasks.values())
    assert len({r["JobId"] for r in tasks.values()}) == 2
    for index, stage in enumerate(study["trainings"]):
        log = (workdir / f"first/logs/train-{study['jobs']['train']}_{index}.out").read_text()
        assert f"Running stage '{stage}'" in log and "Running stage 'train@" not in log.replace(stage, "")
    final = (workdir / f"first/logs/final-{study['jobs']['final']}.out").read_text()
    assert "Running stage 'train@" not in final and final.count("is cached - skipping run") >= 3  # prepare too

    # The final report's metrics equal the local repro's, and nothing was trained twice.
    found = exp_metrics(repo, env)
    for config in CONFIGS:
        for metric in ("psnr", "ssim", "lpips", "mse"):
            assert found["first"][config][metric] == reference[config][metric], (config, metric)
    store = env["MLFLOW_TRACKING_URI"]
    assert training_runs(store) == [("vae", 0), ("vae", 1)]

    # A second submission of the same commit restores every training from the run-cache.
    result = aevae(["slurm", "submit", "--name", "second", "--workdir", str(workdir), "--wait"], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    second = json.loads((workdir / "second/study.json").read_text())
    for index in range(2):
        log = (workdir / f"second/logs/train-{second['jobs']['train']}_{index}.out").read_text()
        assert "Running stage 'train@" not in log and f"Stage '{second['trainings'][index]}' is cached" in log
    assert training_runs(store) == [("vae", 0), ("vae", 1)]
    found = exp_metrics(repo, env)
    assert {c: found["second"][c] for c in CONFIGS} == {c: found["first"][c] for c in CONFIGS}

    # A job that fails is named with its log, and what waited on it never runs.
    result = aevae(["slurm", "submit", "--name", "broken", "--workdir", str(workdir), "--setup", "exit 3"], repo,
                   env)
    assert result.returncode == 0, result.stderr
    result = aevae(["slurm", "status", "broken", "--workdir", str(workdir), "--wait", "--timeout", "120"], repo, env)
    broken = json.loads((workdir / "broken/study.json").read_text())
    assert result.returncode == 1
    assert (f"Error: study broken: prepare failed (exit 3); its log: {workdir}/broken/logs/"
            f"prepare-{broken['jobs']['prepare']}.out") in result.stderr
    listed = aevae(["slurm", "status", "--workdir", str(workdir)], repo, env).stdout
    assert "first" in listed and "second" in listed and "broken" in listed
