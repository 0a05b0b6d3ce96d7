"""`aevae slurm`: the study's trainings as jobs of a real one-node Slurm cluster, gathered through a DVC
remote's run-cache into one DVC experiment that equals a local `dvc repro` of the same commit."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml

from aevae.cluster.jobs import study_states
from aevae.cluster.study import Study, default_setup
from tests.conftest import TINY, copy_project, exp_metrics, merged, one_line_error, project_env, run, slurm_cluster_at
from tests.slurm_cluster import SlurmCluster

# The VAE at two seeds, one thread per training: Slurm runs both at once on two cores, and a local
# `dvc repro` of the same commit must give the same numbers. (One configuration keeps CI short; the array
# has a task per stage whatever their number, as the dry run's four stages show.)
STUDY = merged(TINY, {"train": {"seeds": [0, 1], "threads": 1}, "tune": {"trials": 0}})  # no tuning array
CONFIGS = ("vae",)
# A tuned study: two trials of one seed for the VAE, then its training at the chosen settings. One
# configuration and one seed: a tuning task and a training task, which the two cores would run at once
# were the trainings not waiting for the tuning array.
TUNED = merged(TINY, {"train": {"seeds": [0], "threads": 1}, "tune": {"trials": 2, "seeds": [0]}})


WAIT = ["--wait", "--poll", "1"]  # `aevae slurm ... --wait` looks at the jobs every second, not every 5 s


def study_project(root: Path, env: dict[str, str], configs: tuple[str, ...] = CONFIGS, study: dict = STUDY) -> Path:
    """A committed tiny study with a DVC remote (a folder: on a cluster, a shared path or a URL)."""
    repo = copy_project(root / "repo", study)
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
    return project_env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")


def aevae(args: list[str], repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from aevae.commands.main import main; main()", *args], cwd=repo,
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
    # the trainings and the final job (FID on CUDA) get the GPU; prepare, which only decodes images, does not
    prepare, train, final = scripts.split("#!/bin/bash")[1:]
    assert "--gres" not in prepare and "--gres=gpu:1" in train and "--gres=gpu:1" in final
    assert "aevae-prepare" in prepare and "aevae-train" in train and "aevae-final" in final
    assert "stages=(train@ae-0 train@ae-1 train@vae-0 train@vae-1)" in scripts
    assert 'dvc repro --pull "$stage"' in scripts and "dvc exp run --pull -n s" in scripts
    assert not (repo / ".dvc/tmp/slurm").exists()  # nothing written, nothing submitted
    # Every job requeueable, its log appended to; only the training array told ahead of its time limit.
    assert scripts.count("#SBATCH --requeue") == 3 and scripts.count("#SBATCH --open-mode=append") == 3
    assert scripts.count("#SBATCH --signal=B:USR1@120") == 1
    assert scripts.index("#SBATCH --signal=B:USR1@120") > scripts.index("#SBATCH --job-name=aevae-train")
    for args, error in ((["--time", "02:00", "--notice", "100"], "--notice 100 s leaves less than a minute of "
                                                                   "--time 02:00 (120 s)"),
                        (["--time", "2h"], "--time '2h': use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]]")):
        one_line_error(aevae(["slurm", "submit", "--dry-run", *args], repo, env), error)
    assert "aevae-tune" not in scripts and "tune@" not in scripts  # tune.trials: 0, no tuning array
    (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((repo / "params.yaml").read_text()),
                                                      "tune": {"trials": 2}}, sort_keys=False))
    run(["git", "commit", "-qam", "tuned"], repo, env)
    scripts = aevae(["slurm", "submit", "--dry-run"], repo, env).stdout
    assert scripts.count("#!/bin/bash") == 4 and "#SBATCH --job-name=aevae-tune" in scripts
    assert "stages=(tune@ae tune@vae)" in scripts and "/logs/tune-%A_%a.out" in scripts
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    result = aevae(["slurm", "submit", "--dry-run"], repo, env)
    assert result.returncode == 1 and "uncommitted changes (params.yaml)" in result.stderr
    run(["git", "checkout", "params.yaml"], repo, env)
    run(["dvc", "remote", "default", "--unset"], repo, env)
    run(["git", "commit", "-qam", "no default remote"], repo, env)
    result = aevae(["slurm", "submit", "--dry-run"], repo, env)
    assert result.returncode == 1 and "no default DVC remote in the commit's .dvc/config" in result.stderr
    outside = tmp_path / "not-a-clone"
    shutil.copytree(repo, outside, ignore=shutil.ignore_patterns(".git"))
    one_line_error(aevae(["slurm", "submit", "--dry-run"], outside, env),
                   f"{outside} is not a git repository: the jobs clone a commit")


def training_runs(store: str) -> list[tuple[str, int]]:
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["aevae"])
    trainings = runs[runs["tags.aevae_role"] == "stage"].dropna(subset=["tags.model_config"])
    return sorted(zip(trainings["tags.model_config"], trainings["params.train.seed"].astype(int)))


@dataclass
class Submitted:
    """The study of one commit, submitted once to a running cluster and waited for, beside a local
    `dvc repro` of the same commit in a clone with its own cache and store (the reference numbers)."""

    cluster: SlurmCluster
    repo: Path
    env: dict[str, str]
    workdir: Path
    reference: dict
    first: dict  # study.json of the submission "first"


@pytest.fixture(scope="module")
def submitted(tmp_path_factory) -> Submitted:
    root = tmp_path_factory.mktemp("slurm-study")
    cluster_run = slurm_cluster_at(root / "slurm")
    cluster = next(cluster_run)
    env = project_env(root, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
                      SLURM_CONF=cluster.env["SLURM_CONF"])
    repo = study_project(root, env)
    local = root / "local"
    run(["git", "clone", "-q", str(repo), str(local)], root, env)
    # The local reference runs beside the cluster's jobs, which wait on Slurm much of the time.
    # `dvc repro evaluate`: the pipeline up to the metrics compared below (the report adds none of them).
    reference = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=local, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT,
                                 text=True, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'local.db'}"})
    workdir, start = root / "studies", time.monotonic()
    result = aevae(["slurm", "submit", "--name", "first", "--workdir", str(workdir), *WAIT], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]
    print(f"tiny study on the one-node Slurm cluster, a local dvc repro beside it: {time.monotonic() - start:.0f} s")
    yield Submitted(cluster, repo, env, workdir, json.loads((local / "metrics/eval.json").read_text()),
                    json.loads((workdir / "first/study.json").read_text()))
    cluster_run.close()


@pytest.mark.slow(80)
@pytest.mark.xdist_group("slurm-study")
def test_each_training_of_a_study_is_an_array_task_of_its_own(submitted):
    """Slow: the first test of the group `slurm-study` pays for its fixture, a study submitted to a real cluster
    and waited for, a local dvc repro beside it."""
    study, workdir = submitted.first, submitted.workdir
    records = submitted.cluster.job_records()  # the controller's job records
    tasks = {int(r["ArrayTaskId"]): r for r in records if r.get("ArrayJobId") == study["jobs"]["train"]}
    assert study["trainings"] == ["train@vae-0", "train@vae-1"] and sorted(tasks) == [0, 1]
    assert all(r["JobState"] == "COMPLETED" and r["Name"] == "aevae-train" for r in tasks.values())
    assert len({r["JobId"] for r in tasks.values()}) == 2
    for index, stage in enumerate(study["trainings"]):
        log = (workdir / f"first/logs/train-{study['jobs']['train']}_{index}.out").read_text()
        assert f"Running stage '{stage}'" in log and "Running stage 'train@" not in log.replace(stage, "")
    final = (workdir / f"first/logs/final-{study['jobs']['final']}.out").read_text()
    assert "Running stage 'train@" not in final and final.count("is cached - skipping run") >= 3  # prepare too


@pytest.mark.slow(5)
@pytest.mark.xdist_group("slurm-study")
def test_a_study_on_slurm_equals_a_local_repro_and_logs_each_training_once(submitted):
    found = exp_metrics(submitted.repo, submitted.env)
    for config in CONFIGS:
        for metric in ("psnr", "ssim", "lpips", "mse"):
            assert found["first"][config][metric] == submitted.reference[config][metric], (config, metric)
    assert training_runs(submitted.env["MLFLOW_TRACKING_URI"]) == [("vae", 0), ("vae", 1)]


@pytest.mark.slow(20)
@pytest.mark.xdist_group("slurm-study")
def test_a_second_submission_of_the_same_commit_trains_nothing(submitted):
    repo, env, workdir = submitted.repo, submitted.env, submitted.workdir
    result = aevae(["slurm", "submit", "--name", "second", "--workdir", str(workdir), *WAIT], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    second = json.loads((workdir / "second/study.json").read_text())
    for index in range(2):
        log = (workdir / f"second/logs/train-{second['jobs']['train']}_{index}.out").read_text()
        assert "Running stage 'train@" not in log and f"Stage '{second['trainings'][index]}' is cached" in log
    assert training_runs(env["MLFLOW_TRACKING_URI"]) == [("vae", 0), ("vae", 1)]
    found = exp_metrics(repo, env)
    assert {c: found["second"][c] for c in CONFIGS} == {c: found["first"][c] for c in CONFIGS}


@pytest.mark.slow(8)
@pytest.mark.xdist_group("slurm-study")
def test_a_failed_job_is_named_with_its_log_and_what_waited_never_runs(submitted):
    repo, env, workdir = submitted.repo, submitted.env, submitted.workdir
    result = aevae(["slurm", "submit", "--name", "broken", "--workdir", str(workdir), "--setup", "exit 3"], repo,
                   env)
    assert result.returncode == 0, result.stderr
    result = aevae(["slurm", "status", "broken", "--workdir", str(workdir), *WAIT, "--timeout", "120"], repo, env)
    broken = json.loads((workdir / "broken/study.json").read_text())
    assert result.returncode == 1
    assert (f"Error: study broken: prepare failed (exit 3); its log: {workdir}/broken/logs/"
            f"prepare-{broken['jobs']['prepare']}.out") in result.stderr
    assert not list((workdir / "broken/jobs").glob("train@*"))  # no training started after the failure
    waited = never_ran(submitted.cluster, [broken["jobs"]["train"], broken["jobs"]["final"]])
    assert all(r["JobState"] == "CANCELLED" for r in waited), waited  # Slurm cancelled what waited on it
    listed = aevae(["slurm", "status", "--workdir", str(workdir)], repo, env).stdout
    studies = {path.parent.name for path in workdir.glob("*/study.json")}
    assert {"first", "broken"} <= studies and all(name in listed for name in studies)


def appears(path: Path, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return path.exists()


def never_ran(cluster: SlurmCluster, jobs: list[str], timeout: float = 90) -> list[dict[str, str]]:
    """The controller's records of `jobs` (a pending array is one record) once each has ended, asserting
    that none ever started on a node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = cluster.job_records()
        found = {job: [r for r in records if job in (r.get("JobId"), r.get("ArrayJobId"))] for job in jobs}
        if all(found.values()):
            records = [r for rs in found.values() for r in rs]
            assert all(r["NodeCnt"] == "0" for r in records), records
            return records
        time.sleep(1)
    raise TimeoutError(f"jobs {jobs} still wait after {timeout:g} s: {cluster.job_records()}")


@pytest.mark.slow(10)
@pytest.mark.xdist_group("slurm-study")
def test_a_failed_training_is_named_with_its_log_and_the_final_job_never_runs(submitted):
    """Task 1 of the array dies (its setup exits 4, as a job that loses its node or environment would); task
    0 is restored from the run-cache and succeeds. The study reports the failed training, and Slurm cancels
    the final job that waited on the whole array."""
    repo, env, workdir = submitted.repo, submitted.env, submitted.workdir
    setup = f'if [ "${{SLURM_ARRAY_TASK_ID:-}}" = 1 ]; then exit 4; fi; {default_setup()}'
    result = aevae(["slurm", "submit", "--name", "one-failed", "--workdir", str(workdir), "--setup", setup], repo, env)
    assert result.returncode == 0, result.stderr
    result = aevae(["slurm", "status", "one-failed", "--workdir", str(workdir), *WAIT, "--timeout", "180"], repo,
                   env)
    study = json.loads((workdir / "one-failed/study.json").read_text())
    one_line_error(result, f"Error: study one-failed: train@vae-1 failed (exit 4); its log: {workdir}/one-failed/logs/"
                           f"train-{study['jobs']['train']}_1.out")
    assert appears(workdir / "one-failed/status/train@vae-0.ok")  # task 0 may still push when task 1 has failed
    final = never_ran(submitted.cluster, [study["jobs"]["final"]])
    assert [r["JobState"] for r in final] == ["CANCELLED"]
    assert not (workdir / "one-failed/jobs/final").exists() and not (workdir / "one-failed/status/final.ok").exists()
    listed = aevae(["slurm", "status", "one-failed", "--workdir", str(workdir)], repo, env)
    one_line_error(listed, "study one-failed has a failed job")
    assert "train@vae-1" in listed.stdout and "failed (exit 4)" in listed.stdout and "CANCELLED" in listed.stdout


def test_a_study_saved_before_tuning_arrays_loads_with_none(tmp_path):
    fields = {"name": "old", "commit": "0" * 40, "git_url": "u", "dvc_remote": "storage", "folder": str(tmp_path),
              "trainings": ["train@vae-0"], "tracking_uri": "sqlite:///m.db", "setup": "", "jobs": {"train": "7"}}
    (tmp_path / "study.json").write_text(json.dumps(fields))
    study = Study.load(tmp_path)
    assert study.tunings == [] and [r.stage for r in study_states(study)] == ["prepare", "train@vae-0", "final"]
    assert study.job_of("train@vae-0") == "7_0" and study.log_file("train@vae-0") == tmp_path / "logs/train-7_0.out"


@pytest.mark.slow(70)
@pytest.mark.xdist_group("slurm-study")
def test_with_tune_trials_each_configuration_is_tuned_once_in_an_array_before_the_trainings(submitted, tmp_path):
    """tune.trials: 2. The tuning array's task runs tune@vae once, after prepare; the training array waits for
    it and restores its choice from the run-cache, as the final experiment does; that choice is a local
    `dvc repro tune@vae`'s of the same commit."""
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      SLURM_CONF=submitted.env["SLURM_CONF"])
    repo, workdir, local = study_project(tmp_path, env, CONFIGS, TUNED), tmp_path / "studies", tmp_path / "local"
    run(["git", "clone", "-q", str(repo), str(local)], tmp_path, env)
    reference = subprocess.Popen(["dvc", "repro", "tune@vae"], cwd=local, stdout=subprocess.PIPE, text=True,
                                 stderr=subprocess.STDOUT,
                                 env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'local.db'}"})
    result = aevae(["slurm", "submit", "--name", "tuned", "--workdir", str(workdir), *WAIT], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]
    study = json.loads((workdir / "tuned/study.json").read_text())
    assert study["tunings"] == ["tune@vae"] and study["trainings"] == ["train@vae-0"]
    records = {r["Name"]: r for r in submitted.cluster.job_records() if r.get("ArrayJobId") in
               (study["jobs"]["tune"], study["jobs"]["train"])}
    assert {n: r["JobState"] for n, r in records.items()} == {"aevae-tune": "COMPLETED", "aevae-train": "COMPLETED"}
    assert records["aevae-tune"]["EndTime"] <= records["aevae-train"]["StartTime"], records  # one after the other
    logs = workdir / "tuned/logs"
    assert "Running stage 'tune@vae'" in (logs / f"tune-{study['jobs']['tune']}_0.out").read_text()
    for log in (logs / f"train-{study['jobs']['train']}_0.out", logs / f"final-{study['jobs']['final']}.out"):
        text = log.read_text()
        assert "Running stage 'tune@" not in text and "Stage 'tune@vae' is cached - skipping run" in text, log
    listed = aevae(["slurm", "status", "tuned", "--workdir", str(workdir)], repo, env).stdout.splitlines()
    assert [line.split()[:3] for line in listed if line.endswith(" ok")] == [
        ["prepare", "job", study["jobs"]["prepare"]], ["tune@vae", "job", f"{study['jobs']['tune']}_0"],
        ["train@vae-0", "job", f"{study['jobs']['train']}_0"], ["final", "job", study["jobs"]["final"]]], listed
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["aevae"])
    assert list(runs[runs["tags.aevae_role"] == "tuning"]["tags.tuning_config"]) == ["vae"]  # tuned once
    reference = json.loads((local / "tuned/vae.json").read_text())
    assert reference["trials"] == 2 and set(reference["settings"]) == {"lr"}
    assert experiment_file(repo, env, "tuned", "tuned/vae.json", tmp_path / "dvc-remote") == reference


def experiment_file(repo: Path, env: dict[str, str], name: str, path: str, remote: Path) -> dict:
    """A JSON output of experiment `name` as its dvc.lock records it, read from the DVC remote."""
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).stdout.split()
    ref = next(r for r in refs if r.endswith(f"/{name}"))
    lock = yaml.safe_load(run(["git", "show", f"{ref}:dvc.lock"], repo, env).stdout)
    md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)
    return json.loads((remote / "files/md5" / md5[:2] / md5[2:]).read_text())
