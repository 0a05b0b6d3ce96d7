"""The Slurm cluster of tests/slurm_cluster.py does what the Slurm tests rely on. One node: job arrays, afterok
dependencies (kept back after a failure, or cancelled with --kill-on-invalid-dep), and job records that outlive
the jobs. Two nodes of one CPU each: an array's two tasks run on both, and a job on a node taken down is killed,
requeued and finishes on the other. Without Slurm it skips, except under CI, where it fails: CI must install
Slurm."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import slurm_cluster_at
from tests.slurm_cluster import SlurmCluster


def wait_for(ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """Whether a process runs (a killed one may stay a zombie until its new parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[SlurmCluster]:
    """A running cluster of node1 and node2, one CPU each, under tmp_path/slurm (skipped, or failed under CI,
    as conftest's slurm_cluster is when Slurm or root is missing)."""
    yield from slurm_cluster_at(tmp_path / "slurm", nodes=2)


def test_array_dependencies_and_job_records(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    cluster = slurm_cluster
    work = tmp_path / "work"
    work.mkdir()

    def sbatch(*args: str) -> str:
        return cluster.run("sbatch", "--parsable", f"--chdir={work}", *args).stdout.strip()

    array = sbatch("--array=0-1", "--output=task_%A_%a.out", "--wrap", "echo task $SLURM_ARRAY_TASK_ID; sleep 1")
    after = sbatch(f"--dependency=afterok:{array}", "--output=after_%j.out", "--wrap", "cat task_*.out")
    failing = sbatch("--output=failing_%j.out", "--wrap", "exit 3")
    held = sbatch(f"--dependency=afterok:{failing}", "--output=held_%j.out", "--wrap", "echo must not run")
    killed = sbatch(f"--dependency=afterok:{failing}", "--kill-on-invalid-dep=yes", "--output=killed_%j.out",
                    "--wrap", "echo must not run")

    wait_for(lambda: len(cluster.job_records()) == 5, "five finished jobs in the jobcomp file")
    records = cluster.job_records()
    tasks = {r["ArrayTaskId"]: r for r in records if r.get("ArrayJobId") == array}
    by_id = {r["JobId"]: r for r in records if "ArrayJobId" not in r}
    assert sorted(tasks) == ["0", "1"] and all(r["JobState"] == "COMPLETED" for r in tasks.values()), records
    for task in ("0", "1"):  # %A_%a: one output file per task, named by the array's id and the task's index
        assert (work / f"task_{array}_{task}.out").read_text() == f"task {task}\n"

    # afterok on the array: started once both tasks had ended, and saw both outputs
    assert by_id[after]["JobState"] == "COMPLETED"
    assert by_id[after]["StartTime"] >= max(r["EndTime"] for r in tasks.values())
    assert (work / f"after_{after}.out").read_text() == "task 0\ntask 1\n"

    assert by_id[failing]["JobState"] == "FAILED" and by_id[failing]["ExitCode"] == "3:0"
    # afterok on a failed job: with --kill-on-invalid-dep it is cancelled, without it stays pending for ever
    assert by_id[killed]["JobState"] == "CANCELLED" and by_id[killed]["NodeCnt"] == "0"
    assert held not in by_id
    shown = cluster.run("scontrol", "show", "job", held).stdout
    assert "JobState=PENDING" in shown and "Reason=DependencyNeverSatisfied" in shown, shown
    assert not list(work.glob("held_*")) and not list(work.glob("killed_*"))

    # the controller still knows finished jobs (MinJobAge), and sacct reads the jobcomp file (-c) without slurmdbd
    states = cluster.run("squeue", "--noheader", "--states=all", "--format=%i %T").stdout.split("\n")
    assert f"{array}_0 COMPLETED" in states and f"{failing} FAILED" in states, states
    completion = cluster.run("sacct", "--completion", "--parsable2", "--format=JobID,State,ExitCode").stdout
    assert f"{failing}|FAILED|3:0" in completion.splitlines(), completion

    cluster.stop()  # cancels the job that would wait for ever, and ends every daemon
    assert {r["JobId"]: r["JobState"] for r in cluster.job_records()}[held] == "CANCELLED"
    assert not cluster.processes


def test_two_nodes_run_one_array_task_each(two_nodes: SlurmCluster, tmp_path: Path) -> None:
    """Two nodes of one CPU: a two-task array of one CPU per task runs a task on each node, at once; stop() ends
    a job's process that escaped its slurmstepd (~7 s)."""
    cluster = two_nodes
    assert cluster.nodes == ["node1", "node2"] and cluster.node_states() == {"node1": "idle", "node2": "idle"}
    array = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0-1", "--cpus-per-task=1",
                        "--output=task_%a.out", "--wrap", "sleep 3; echo $SLURMD_NODENAME").stdout.strip()
    wait_for(lambda: len(cluster.job_records()) == 2, "both tasks in the jobcomp file", timeout=30)
    tasks = {r["ArrayTaskId"]: r for r in cluster.job_records()}
    assert all(r["JobState"] == "COMPLETED" and r["ArrayJobId"] == array for r in tasks.values()), tasks
    nodes = {task: r["NodeList"] for task, r in tasks.items()}
    assert sorted(nodes.values()) == ["node1", "node2"], nodes
    for task, node in nodes.items():  # the job ran where the record says, and both ran side by side
        assert (tmp_path / f"task_{task}.out").read_text() == f"{node}\n"
        assert cluster.node_of(f"{array}_{task}") == node
    assert max(r["StartTime"] for r in tasks.values()) < min(r["EndTime"] for r in tasks.values()), tasks

    # a child that ignores SIGTERM outlives its cancelled job (proctrack/linuxproc loses it once its batch shell
    # dies), and stop() still ends it
    cluster.run("sbatch", f"--chdir={tmp_path}", "--output=/dev/null", "--wrap",
                "bash -c 'trap \"\" TERM; echo $$ > orphan.pid; sleep 300' & sleep 300")
    wait_for(lambda: (tmp_path / "orphan.pid").exists(), "the orphan to be", timeout=20)
    cluster.stop()
    assert not alive(int((tmp_path / "orphan.pid").read_text()))


def test_a_job_on_a_node_taken_down_is_requeued_on_the_other(two_nodes: SlurmCluster, tmp_path: Path) -> None:
    """A --requeue job runs on a node set DOWN: its processes are killed, it is requeued (Restarts=1) and runs
    again on the other node; the node comes back idle on RESUME (~12 s: KillWait 5 s, requeue delay 6 s)."""
    cluster = two_nodes
    script = ('echo "run ${SLURM_RESTART_COUNT:-0} on $SLURMD_NODENAME"; '
              '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || { echo $$ > first.pid; sleep 120; }')
    job = cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--requeue", "--open-mode=append",
                      "--output=job.out", "--wrap", script).stdout.strip()
    wait_for(lambda: (tmp_path / "first.pid").exists(), "the job's first run", timeout=20)
    first_node, pid = cluster.node_of(job), int((tmp_path / "first.pid").read_text())
    other = next(node for node in cluster.nodes if node != first_node)

    cluster.set_node(first_node, "DOWN", reason="test")
    assert cluster.node_states()[first_node].startswith("down"), cluster.node_states()
    wait_for(lambda: not alive(pid), "the first run's batch script to be killed", timeout=20)
    wait_for(lambda: cluster.job(job)["JobState"] == "COMPLETED", "the job's second run", timeout=30)
    shown = cluster.job(job)
    assert shown["Restarts"] == "1" and shown["NodeList"] == other, shown
    assert (tmp_path / "job.out").read_text().splitlines()[0] == f"run 0 on {first_node}"
    assert (tmp_path / "job.out").read_text().splitlines()[-1] == f"run 1 on {other}"
    # jobcomp has a line per run: the killed one as NODE_FAIL
    records = [(r["JobId"], r["JobState"], r["NodeList"]) for r in cluster.job_records()]
    assert records == [(job, "NODE_FAIL", first_node), (job, "COMPLETED", other)], records

    cluster.set_node(first_node, "RESUME")
    wait_for(lambda: cluster.node_states()[first_node] == "idle", "the node back to idle", timeout=10)
