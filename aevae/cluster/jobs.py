"""Submitting a study's jobs to Slurm and watching them: the trainings as Slurm jobs, gathered through
DVC's run-cache (docs/slurm.md).

A submission is one study of one commit, in a folder of its own under the work directory:

    prepare ──afterok──> train array: one task per training stage ──afterok──> final
    (dvc repro --pull prepare)   (dvc repro --pull train@<model>-<seed>)      (dvc exp run --pull -n <study>)

With tune.trials > 0 a tuning array, one task per tune@<model> (dvc repro --pull tune@<model>), runs between
prepare and the trainings, so each configuration is tuned once: the trainings restore its choice.

Every job clones the commit into its own folder and shares the rest through the DVC remote: it restores
what any machine pushed before (`--pull`, outputs and run-cache), runs only its stage, and pushes the
stage's outputs and run-cache entry. The final job runs the whole pipeline as a DVC experiment named after
the study: each training is restored from the run-cache, never trained again, and evaluation and report
run; `dvc exp push` sends the experiment to the git remote and its outputs to the DVC remote, where
`dvc exp pull <remote> <study>` finds it. MLflow receives every run at the submitter's tracking URI.

Nothing imports aevae.cluster unless `aevae slurm` runs, and it only calls Slurm's commands (sbatch, squeue).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from aevae import AevaeError
from aevae.cluster.scripts import scripts
from aevae.cluster.study import FINAL, PREPARE, TRAIN, TUNE, Resources, Study


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise AevaeError("sbatch not found: this machine has no Slurm client on PATH; submit from a cluster's login "
                         "node (dvc repro runs the study here)")
    return found


def _sbatch(script: Path, *options: str) -> str:
    result = subprocess.run([sbatch_path(), "--parsable", *options, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise AevaeError(f"sbatch refused {script.name}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def submit(study: Study, resources: Resources) -> Study:
    """Write the scripts into the study's folder and submit: prepare, then the tuning array after it (if any),
    then the training array, then the final job after every training (a failed dependency cancels what waits
    on it)."""
    for sub in ("logs", "status", "jobs", "scripts"):
        (study.path / sub).mkdir(parents=True, exist_ok=True)
    files = {}
    for part, text in scripts(study, resources).items():
        files[part] = study.path / "scripts" / f"{part}.sbatch"
        files[part].write_text(text, encoding="utf-8")
    study.save()  # before the first sbatch: a study whose submission broke off is still visible
    study.jobs[PREPARE] = after = _sbatch(files[PREPARE])
    for part in (TUNE, TRAIN) if study.tunings else (TRAIN,):
        study.jobs[part] = after = _sbatch(files[part], f"--array=0-{len(study.stages_of(part)) - 1}",
                                           f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes")
    study.jobs[FINAL] = _sbatch(files[FINAL], f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes")
    study.save()
    return study


def _queue_states(study: Study) -> dict[str, tuple[str, str]]:
    """Slurm's view of the study's jobs that it still lists: job id -> (state, reason)."""
    if shutil.which("squeue") is None or not study.jobs:
        return {}
    result = subprocess.run(["squeue", "--array", "--states=all", "--noheader", "--format=%i|%T|%r",
                             f"--jobs={','.join(study.jobs.values())}"], capture_output=True, text=True)
    states = {}
    for line in result.stdout.splitlines():
        job, state, reason = (line.split("|") + ["", ""])[:3]
        states[job.strip()] = (state.strip(), reason.strip())
    return states


@dataclass(frozen=True)
class JobState:
    stage: str
    job: str
    state: str  # ok, failed (exit N), or Slurm's state: PENDING, RUNNING, CANCELLED, ...
    log: Path
    nodes: tuple[str, ...] = ()  # where each run of the job started, in order: more than one = requeued

    @property
    def restarts(self) -> int:
        return max(len(self.nodes) - 1, 0)


def job_starts(study: Study, stage: str) -> tuple[str, ...]:
    """The node of each start of `stage`'s job (status/<stage>.starts: time, job id, node, restart count)."""
    try:
        lines = (study.path / "status" / f"{stage}.starts").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return ()
    return tuple(line.split()[2] for line in lines if len(line.split()) >= 3)


def study_states(study: Study) -> list[JobState]:
    """Each stage's state: its own result file when the job finished, else what squeue says."""
    queue = _queue_states(study)
    rows = []
    for stage in [PREPARE, *study.tunings, *study.trainings, FINAL]:
        job = study.job_of(stage)
        status = study.path / "status"
        if (status / f"{stage}.ok").exists():
            state = "ok"
        elif (status / f"{stage}.failed").exists():
            state = f"failed (exit {(status / f'{stage}.failed').read_text().strip()})"
        elif job in queue:
            state, reason = queue[job]
            state += f" ({reason})" if reason and reason != "None" else ""
        else:
            state = "unknown (Slurm no longer lists it and it left no result: see its log)"
        rows.append(JobState(stage, job, state, study.log_file(stage), job_starts(study, stage)))
    return rows


def finished(rows: list[JobState]) -> bool | None:
    """True when the final job succeeded, False when any job failed or was cancelled, None while running."""
    # A requeued job is PENDING again at once (preempted with PreemptMode=REQUEUE, node failure, scontrol
    # requeue): these states are final.
    ended = ("failed", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
             "DEADLINE", "unknown")
    if any(r.state.startswith(ended) for r in rows):
        return False
    return True if rows[-1].state == "ok" else None


def list_studies(workdir: Path) -> list[Path]:
    return sorted((p.parent for p in workdir.glob("*/study.json")), key=lambda p: p.stat().st_mtime)


def wait(study: Study, poll: float, timeout: float | None) -> list[JobState]:
    """Poll until the study succeeded or a job failed (or `timeout` seconds passed)."""
    start = time.monotonic()
    while True:
        rows = study_states(study)
        if finished(rows) is not None or (timeout is not None and time.monotonic() - start > timeout):
            return rows
        time.sleep(poll)


def environment_note() -> str:
    """What the jobs inherit from the submitting shell (sbatch passes the environment by default)."""
    shared = [k for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
              if k in os.environ]
    return f"jobs inherit {', '.join(shared)}" if shared else "jobs log to the tracking URI above"

