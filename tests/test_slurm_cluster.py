"""The one-node Slurm cluster of tests/slurm_cluster.py does what the Slurm tests rely on: job arrays, afterok
dependencies (kept back after a failure, or cancelled with --kill-on-invalid-dep), and job records that outlive
the jobs. Without Slurm it skips, except under CI, where it fails: CI must install Slurm."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.slurm_cluster import SlurmCluster


def wait_for(ready: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


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
