"""A study on a real Slurm cluster of three nodes (one CPU each: tests/slurm_cluster.py) with the faults of a
lab's cluster, all in one submission: a node taken down under a training, a training requeued by
`scontrol requeue`, and one whose time limit comes. Each training resumes from its saved state in its clone
on the shared work directory, on whichever node, in its MLflow run; the study's metrics equal a local
`dvc repro` of the same commit exactly (one torch thread per training on both sides), and `aevae slurm
status` shows the requeues. The module takes 2.5 to 3 minutes on 2 cores (the local reference runs beside
the cluster's jobs)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from tests.conftest import TINY, exp_metrics, merged, project_env, run, slurm_cluster_at
from tests.slurm_cluster import SlurmCluster
from tests.test_slurm import WAIT, aevae, study_project, training_runs

pytestmark = [pytest.mark.slow(45), pytest.mark.xdist_group("slurm-nodes")]  # one cluster, one worker

EPOCHS = 100  # ~0.4 s each: a training outlasts the ~30 s between Slurm's time-limit checks
STUDY = merged(TINY, {"epochs": EPOCHS, "data": {"builtin_size": 200}, "train": {"seeds": [0, 1], "threads": 1},
                      "tune": {"trials": 0}, "tracking": {"images_every": 0}})


def wait_for_line(log: Path, pattern: str, timeout: float = 120, after: int = 0) -> re.Match:
    """The first match of `pattern` in `log` past character `after`, waiting for it to be written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = re.compile(pattern).search(text, after)
        if found:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not in {log} after {timeout:g} s:\n{text[-3000:]}")


@dataclass
class Faulted:
    cluster: SlurmCluster
    repo: Path
    env: dict[str, str]
    workdir: Path
    study: dict
    reference: dict
    first_nodes: dict[str, str]  # task -> the node it started on
    down: str  # the node taken down
    status: str  # `aevae slurm status` at the end


def _task_started(cluster: SlurmCluster, task: str) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = cluster.job(task)
        if job.get("JobState") == "RUNNING":
            return job["NodeList"]
        time.sleep(0.5)
    raise TimeoutError(f"task {task} never ran: {cluster.job(task)}")


def _update(cluster: SlurmCluster, task: str, *fields: str) -> None:
    """scontrol update of a job that may be between states (COMPLETING refuses some updates): retried."""
    deadline = time.monotonic() + 30
    while cluster.run("scontrol", "update", f"JobId={task}", *fields, check=False).returncode != 0:
        assert time.monotonic() < deadline, cluster.job(task)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def faulted(tmp_path_factory) -> Faulted:
    root = tmp_path_factory.mktemp("slurm-nodes")
    cluster_run = slurm_cluster_at(root / "slurm", nodes=3)
    cluster = next(cluster_run)
    env = project_env(root, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", SLURM_CONF=cluster.env["SLURM_CONF"])
    repo = study_project(root, env, ("vae",), STUDY)
    local = root / "local"
    run(["git", "clone", "-q", str(repo), str(local)], root, env)
    # `dvc repro evaluate`: the pipeline up to the metrics compared below (the report adds none of them).
    reference = subprocess.Popen(["dvc", "repro", "evaluate"], cwd=local, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT,
                                 text=True, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'local.db'}"})
    workdir, start = root / "studies", time.monotonic()
    result = aevae(["slurm", "submit", "--name", "faults", "--workdir", str(workdir)], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr
    study = json.loads((workdir / "faults/study.json").read_text())
    tasks = [f"{study['jobs']['train']}_{i}" for i in range(2)]
    logs = [workdir / f"faults/logs/train-{study['jobs']['train']}_{i}.out" for i in range(2)]
    first_nodes = {task: _task_started(cluster, task) for task in tasks}
    # Task 0: its time limit comes. Cut to a minute, under the 120 s notice, as it starts: at Slurm's next
    # time check (every ~30 s) the job script gets SIGUSR1, the training saves its state and stops, and the
    # job requeues itself. Its limit is given back once it is requeued, so that its next run completes.
    _update(cluster, tasks[0], "TimeLimit=1")
    # Task 1: its node goes down once it has saved two epochs; Slurm requeues it to a free node, where it
    # resumes. Two epochs later it is requeued by hand (scontrol requeue) and resumes again.
    wait_for_line(logs[1], rf"vae-seed1 epoch 2/{EPOCHS}")
    down = first_nodes[tasks[1]]
    cluster.set_node(down, "DOWN", "test: node lost")
    resumed = wait_for_line(logs[1], r"vae: resuming (after epoch \d+|in epoch \d+ after batch \d+)")
    epoch = wait_for_line(logs[1], rf"vae-seed1 epoch (\d+)/{EPOCHS}", after=resumed.end())
    wait_for_line(logs[1], rf"vae-seed1 epoch {int(epoch[1]) + 2}/{EPOCHS}", after=resumed.end())
    cluster.run("scontrol", "requeue", tasks[1])
    wait_for_line(logs[0], r"aevae: requeueing job", timeout=120)
    _update(cluster, tasks[0], "TimeLimit=UNLIMITED")

    result = aevae(["slurm", "status", "faults", "--workdir", str(workdir), *WAIT, "--timeout", "400"], repo, env)
    assert result.returncode == 0, result.stdout + result.stderr + "\n".join(p.read_text() for p in logs)
    cluster.set_node(down, "RESUME")
    status = aevae(["slurm", "status", "faults", "--workdir", str(workdir)], repo, env).stdout
    output, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, output[-3000:]
    print(f"three-node study with three faults: {time.monotonic() - start:.0f} s")
    yield Faulted(cluster, repo, env, workdir, study, json.loads((local / "metrics/eval.json").read_text()),
                  first_nodes, down, status)
    cluster_run.close()


def _log(faulted: Faulted, task: int) -> str:
    return (faulted.workdir / f"faults/logs/train-{faulted.study['jobs']['train']}_{task}.out").read_text()


def _starts(faulted: Faulted, stage: str) -> list[list[str]]:
    """status/<stage>.starts: [time, job id, node, "restart", count] per start."""
    return [line.split() for line in (faulted.workdir / f"faults/status/{stage}.starts").read_text().splitlines()]


def test_the_array_spreads_over_the_nodes_and_the_study_equals_a_local_repro(faulted):
    """Slow: the first test of the group `slurm-nodes` pays for its fixture (the module docstring says why it takes
    minutes)."""
    assert len(set(faulted.first_nodes.values())) == 2, faulted.first_nodes  # one training per node
    found = exp_metrics(faulted.repo, faulted.env)["faults"]
    for metric in ("psnr", "ssim", "lpips", "mse"):
        assert found["vae"][metric] == faulted.reference["vae"][metric], metric
    nodes = {r["NodeList"] for r in faulted.cluster.job_records() if r.get("JobState") == "COMPLETED"}
    assert len(nodes) >= 2, nodes  # the jobs that completed ran on several nodes


def _stopped_then_resumed(segment: str, seed: int) -> str:
    """Where a training stopped by SIGTERM in `segment` of its log saved its state, asserting that the next
    run resumed from exactly there."""
    stopped = re.search(rf"vae-seed{seed} stopped by SIGTERM (in epoch \d+ after batch \d+|after epoch \d+)", segment)
    assert stopped, segment[-3000:]
    assert f"vae: resuming {stopped[1]} from" in segment[stopped.end():], segment[-3000:]
    return stopped[1]


def test_a_training_on_a_node_taken_down_resumes_on_another_and_only_it_is_requeued(faulted):
    log, starts = _log(faulted, 1), _starts(faulted, "train@vae-1")
    assert starts[0][2] == faulted.down and starts[1][2] != faulted.down, starts  # elsewhere
    assert [s[4] for s in starts] == ["0", "1", "2"], starts  # node down, then scontrol requeue
    # SIGTERM reached the training on the downed node: it saved its state, which the next run, on another
    # node, resumed from.
    _stopped_then_resumed(log[log.index("DUE TO NODE FAILURE"): log.index("DUE TO JOB REQUEUE")], 1)
    assert "NODE FAILURE" not in _log(faulted, 0)  # the other training, on another node, went on untouched


def test_scontrol_requeue_stops_a_training_that_resumes_from_its_last_state(faulted):
    after = _log(faulted, 1)[_log(faulted, 1).index("DUE TO JOB REQUEUE"):]
    _stopped_then_resumed(after, 1)
    assert f"vae-seed1 epoch {EPOCHS}/{EPOCHS}" in after


def test_a_training_whose_time_limit_comes_saves_requeues_itself_and_completes(faulted):
    log, starts = _log(faulted, 0), _starts(faulted, "train@vae-0")
    assert "aevae: SIGUSR1" in log and "aevae: requeueing job" in log
    # Saved after the batch the notice came in (or after the epoch, when it came while validating), and
    # resumed from exactly there.
    stopped = re.search(r"vae-seed0 stopped by SIGUSR1 (in epoch \d+ after batch \d+|after epoch \d+)", log)
    assert stopped, log[-3000:]
    assert f"vae: resuming {stopped[1]} from" in log[stopped.end():]
    assert "DUE TO TIME LIMIT" not in log and [s[4] for s in starts] == ["0", "1"], starts
    assert f"vae-seed0 epoch {EPOCHS}/{EPOCHS}" in log


def test_each_training_is_one_mlflow_run_with_every_epoch_and_status_shows_the_requeues(faulted):
    assert training_runs(faulted.env["MLFLOW_TRACKING_URI"]) == [("vae", 0), ("vae", 1)]
    mlflow.set_tracking_uri(faulted.env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    for run_id in mlflow.search_runs(experiment_names=["aevae"], filter_string="tags.model_config = 'vae'")["run_id"]:
        steps = {m.step for m in client.get_metric_history(run_id, "val_loss")}
        assert steps == set(range(1, EPOCHS + 1)) and client.get_run(run_id).info.status == "FINISHED"
    lines = {line.split()[0]: line for line in faulted.status.splitlines()}
    assert " ok  requeued 1x, ran on " in lines["train@vae-0"], faulted.status
    down_line = lines["train@vae-1"]
    assert f" ok  requeued 2x, ran on {faulted.down} -> " in down_line, faulted.status
    assert "requeued" not in lines["prepare"] and "requeued" not in lines["final"]
