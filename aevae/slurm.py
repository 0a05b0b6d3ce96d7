"""The study's trainings as Slurm jobs, gathered through DVC's run-cache (docs/slurm.md).

A submission is one study of one commit, in a folder of its own under the work directory:

    prepare ──afterok──> train array: one task per training stage ──afterok──> final
    (dvc repro --pull prepare)   (dvc repro --pull train@<model>-<seed>)      (dvc exp run --pull -n <study>)

Every job clones the commit into its own folder and shares the rest through the DVC remote: it restores
what any machine pushed before (`--pull`, outputs and run-cache), runs only its stage, and pushes the
stage's outputs and run-cache entry. The final job runs the whole pipeline as a DVC experiment named after
the study: each training is restored from the run-cache, never trained again, and evaluation and report
run; `dvc exp push` sends the experiment to the git remote and its outputs to the DVC remote, where
`dvc exp pull <remote> <study>` finds it. MLflow receives every run at the submitter's tracking URI.

Nothing imports this module unless `aevae slurm` runs, and it only calls Slurm's commands (sbatch, squeue).
"""

from __future__ import annotations

import configparser
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aevae import AevaeError
from aevae.params import Params

log = logging.getLogger(__name__)

FINAL = "final"
PREPARE = "prepare"
STATES_DONE = ("ok", "failed")


@dataclass(frozen=True)
class Resources:
    """What each job asks Slurm for (sbatch's options of the same names)."""

    partition: str | None = None
    cpus: int = 1
    mem: str | None = None
    time: str | None = None
    gpus: int = 0

    def directives(self) -> list[str]:
        lines = [f"--cpus-per-task={self.cpus}"]
        lines += [f"--partition={self.partition}"] if self.partition else []
        lines += [f"--mem={self.mem}"] if self.mem else []
        lines += [f"--time={self.time}"] if self.time else []
        lines += [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        return [f"#SBATCH {line}" for line in lines]


@dataclass
class Study:
    """One submission: the commit, where its jobs clone from and share through, and its Slurm jobs."""

    name: str
    commit: str
    git_url: str
    dvc_remote: str
    folder: str
    trainings: list[str]
    tracking_uri: str
    setup: str
    jobs: dict[str, str] = field(default_factory=dict)  # prepare / train / final -> Slurm job id

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def log_file(self, stage: str) -> Path:
        """Slurm's output file of the job that runs `stage` (known once the job is submitted)."""
        if stage in self.trainings:
            return self.path / "logs" / f"train-{self.jobs.get('train', '%A')}_{self.trainings.index(stage)}.out"
        part = FINAL if stage == FINAL else PREPARE
        return self.path / "logs" / f"{part}-{self.jobs.get(part, '%j')}.out"

    def save(self) -> None:
        (self.path / "study.json").write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Study:
        try:
            return cls(**json.loads((folder / "study.json").read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise AevaeError(f"no study in {folder} (no study.json): aevae slurm status lists the studies") from None


# --------------------------------------------------------------------------- what to submit


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if result.returncode != 0:
        raise AevaeError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def check_committed(repo: Path) -> str:
    """The commit the jobs will run; refuses uncommitted changes to tracked files (jobs would not see them)."""
    changed = _git(repo, "status", "--porcelain", "--untracked-files=no")
    if changed:
        files = ", ".join(line.split(None, 1)[1] for line in changed.splitlines()[:3])
        raise AevaeError(f"uncommitted changes ({files}): the jobs run a commit, so commit them first "
                         "(git commit -am ..., dvc.lock included)")
    return _git(repo, "rev-parse", "HEAD")


def default_git_url(repo: Path, commit: str) -> str:
    """Where the jobs clone from: origin when it has the commit, else this repository (a shared filesystem)."""
    try:
        url = _git(repo, "remote", "get-url", "origin")
    except AevaeError:
        return str(repo.resolve())
    if not _git(repo, "branch", "-r", "--contains", commit):
        raise AevaeError(f"commit {commit[:8]} is not on origin ({url}): git push first, the jobs clone from it "
                         "(or pass --git-url)")
    return url


def committed_dvc_remote(repo: Path, commit: str, name: str | None) -> str:
    """The DVC remote the jobs share through: `name`, or the default remote of the commit's .dvc/config
    (a remote only in .dvc/config.local would be invisible to the jobs' clones)."""
    config = configparser.ConfigParser(strict=False, interpolation=None)
    config.read_string(_git(repo, "show", f"{commit}:.dvc/config") if _has_dvc_config(repo, commit) else "")
    remotes = {s.split('"')[1] for s in config.sections() if s.startswith("'remote ")}
    name = name or config.get("core", "remote", fallback=None)
    if not name or name not in remotes:
        listed = ", ".join(sorted(remotes)) or "none"
        raise AevaeError(f"{'remote ' + repr(name) if name else 'no default DVC remote'} in the commit's .dvc/config "
                         f"(committed remotes: {listed}): the jobs share data, models and run-cache through one; "
                         "dvc remote add -d storage <shared path or URL>, then commit .dvc/config")
    return name


def _has_dvc_config(repo: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}:.dvc/config"], cwd=repo).returncode == 0


def default_setup() -> str:
    """Shell lines that give a job this Python and its dvc: the interpreter's bin folder first on PATH."""
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""


def plan_study(repo: Path, params: Params, workdir: Path, *, git_url: str | None, dvc_remote: str | None,
               setup: str | None, name: str | None) -> Study:
    """The study of the current commit: every (configuration, seed) of params.yaml is a training job."""
    from aevae.store import tracking_uri

    if not (repo / ".git").exists():
        raise AevaeError(f"{repo} is not a git repository: the jobs clone a commit, so run aevae slurm submit in "
                         "the project's git clone")
    commit = check_committed(repo)
    name = name or f"study-{commit[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise AevaeError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder and a DVC "
                         "experiment)")
    return Study(name=name, commit=commit, git_url=git_url or default_git_url(repo, commit),
                 dvc_remote=committed_dvc_remote(repo, commit, dvc_remote),
                 folder=str((workdir / name).resolve()),
                 trainings=[f"train@{config}-{seed}" for config, seed in params.trainings()],
                 tracking_uri=tracking_uri(), setup=setup or default_setup())


# --------------------------------------------------------------------------- the job scripts


def _header(study: Study, part: str, resources: Resources, output: str, stage: str) -> list[str]:
    """The directives, then the job's result recorded whatever happens (for `aevae slurm status`:
    status/<stage>.ok, or .failed with the exit code), then the user's setup."""
    return ["#!/bin/bash",
            f"#SBATCH --job-name=aevae-{part}",
            f"#SBATCH --output={study.path / 'logs' / output}",
            *resources.directives(),
            f"# aevae study {study.name}: commit {study.commit}",
            "set -euo pipefail",
            stage,
            f"status={shlex.quote(str(study.path / 'status'))}",
            'mark() { code=$?; if [ "$code" = 0 ]; then echo 0 > "$status/$stage.ok"; '
            'else echo "$code" > "$status/$stage.failed"; fi; }',
            "trap mark EXIT",
            study.setup,
            f"export MLFLOW_TRACKING_URI={shlex.quote(study.tracking_uri)}",
            # Each job works in its own clone of the commit; a rerun of the job starts from a fresh one.
            f'clone() {{ rm -rf "$1"; git clone --quiet {shlex.quote(study.git_url)} "$1"; '
            f'git -C "$1" checkout --quiet --detach {study.commit}; '
            f'(cd "$1" && dvc remote default --local {shlex.quote(study.dvc_remote)}); }}']


def stage_script(study: Study, resources: Resources) -> str:
    """The training array: task i runs study.trainings[i] (the prepare job runs the same lines for `prepare`)."""
    stages = " ".join(shlex.quote(s) for s in study.trainings)
    pick = f"stages=({stages}); stage=${{stages[$SLURM_ARRAY_TASK_ID]}}"
    return "\n".join([*_header(study, "train", resources, "train-%A_%a.out", pick), *_repro_lines(study)]) + "\n"


def prepare_script(study: Study, resources: Resources) -> str:
    return "\n".join([*_header(study, PREPARE, resources, "prepare-%j.out", f"stage={PREPARE}"),
                      *_repro_lines(study)]) + "\n"


def _repro_lines(study: Study) -> list[str]:
    return [f'work={shlex.quote(str(study.path / "jobs"))}/"$stage"',
            'echo "aevae: $stage of commit ' + study.commit[:8] + ' in $work on $(hostname)"',
            'clone "$work" && cd "$work"',
            # --pull restores what any machine pushed before (data, and this stage from the run-cache if it was
            # ever run with these params, data and code); only a missing result runs.
            'dvc repro --pull "$stage"',
            'dvc push --run-cache "$stage"']


def final_script(study: Study, resources: Resources) -> str:
    return "\n".join([
        *_header(study, FINAL, resources, "final-%j.out", f"stage={FINAL}"),
        f'work={shlex.quote(str(study.path / "jobs" / FINAL))}',
        'clone "$work" && cd "$work"',
        # Every training is in the run-cache now: the experiment restores them and runs the rest.
        f"dvc exp run --pull -n {shlex.quote(study.name)}",
        f"dvc exp push --run-cache origin {shlex.quote(study.name)}",
        f'echo "aevae: experiment {study.name} pushed; get it with: dvc exp pull origin {study.name}"',
    ]) + "\n"


def scripts(study: Study, resources: Resources) -> dict[str, str]:
    return {PREPARE: prepare_script(study, resources), "train": stage_script(study, resources),
            FINAL: final_script(study, resources)}


# --------------------------------------------------------------------------- submitting and watching


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
    """Write the scripts into the study's folder and submit: prepare, then the array after it, then the
    final job after every training (a failed dependency cancels what waits on it)."""
    for sub in ("logs", "status", "jobs", "scripts"):
        (study.path / sub).mkdir(parents=True, exist_ok=True)
    files = {}
    for part, text in scripts(study, resources).items():
        files[part] = study.path / "scripts" / f"{part}.sbatch"
        files[part].write_text(text, encoding="utf-8")
    study.save()  # before the first sbatch: a study whose submission broke off is still visible
    study.jobs[PREPARE] = _sbatch(files[PREPARE])
    study.jobs["train"] = _sbatch(files["train"], f"--array=0-{len(study.trainings) - 1}",
                                  f"--dependency=afterok:{study.jobs[PREPARE]}", "--kill-on-invalid-dep=yes")
    study.jobs[FINAL] = _sbatch(files[FINAL], f"--dependency=afterok:{study.jobs['train']}",
                                "--kill-on-invalid-dep=yes")
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


def study_states(study: Study) -> list[JobState]:
    """Each stage's state: its own result file when the job finished, else what squeue says."""
    queue = _queue_states(study)
    rows = []
    for stage in [PREPARE, *study.trainings, FINAL]:
        if stage in study.trainings:
            job = f"{study.jobs.get('train', '?')}_{study.trainings.index(stage)}"
        else:
            job = study.jobs.get(stage, "?")
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
        rows.append(JobState(stage, job, state, study.log_file(stage)))
    return rows


def finished(rows: list[JobState]) -> bool | None:
    """True when the final job succeeded, False when any job failed or was cancelled, None while running."""
    if any(r.state.startswith(("failed", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "unknown"))
           for r in rows):
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
