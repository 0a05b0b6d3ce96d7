"""A study to submit: the commit its jobs run, where they clone it from and share through, and the jobs
Slurm gave them (docs/slurm.md)."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aevae import AevaeError
from aevae.config.schema import Params

FINAL = "final"
PREPARE = "prepare"
TUNE = "tune"  # the tuning array (tune.trials > 0 only): one task per tune@<configuration>
TRAIN = "train"  # the training array: one task per train@<configuration>-<seed>


@dataclass(frozen=True)
class Resources:
    """What each job asks Slurm for (sbatch's options of the same names)."""

    partition: str | None = None
    cpus: int = 1
    mem: str | None = None
    time: str | None = None
    gpus: int = 0
    notice: int = 120  # seconds ahead of the time limit that a job is told to save and requeue

    def check(self) -> None:
        """The notice must come well after a job starts: a training told to stop before it has had time to
        start (clone, dvc pull, imports) and train would be requeued again and again without progress."""
        limit = time_limit_seconds(self.time) if self.time else None
        if limit is not None and limit - self.notice < 60:
            raise AevaeError(f"--notice {self.notice} s leaves less than a minute of --time {self.time} ({limit} s) "
                             "before a training is told to stop; lower --notice or raise --time")

    def directives(self, gpus: bool = True) -> list[str]:
        """The #SBATCH lines; `gpus`: this job may use the GPUs asked for (prepare only decodes images)."""
        lines = [f"--cpus-per-task={self.cpus}"]
        lines += [f"--partition={self.partition}"] if self.partition else []
        lines += [f"--mem={self.mem}"] if self.mem else []
        lines += [f"--time={self.time}"] if self.time else []
        lines += [f"--gres=gpu:{self.gpus}"] if self.gpus and gpus else []
        return [f"#SBATCH {line}" for line in lines]


def time_limit_seconds(text: str) -> int | None:
    """sbatch's --time in seconds: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
    days-hours:minutes or days-hours:minutes:seconds (None: UNLIMITED); a one-line error for anything else."""
    if text.strip().upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise AevaeError(f"--time {text!r}: use minutes, MM:SS, HH:MM:SS or D-HH[:MM[:SS]] (sbatch's forms)")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        return ((int(days) * 24 + int(first)) * 60 + int(second or 0)) * 60 + int(third or 0)
    if third is not None:  # HH:MM:SS
        return (int(first) * 60 + int(second)) * 60 + int(third)
    return int(first) * 60 + int(second or 0)  # MM or MM:SS


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
    jobs: dict[str, str] = field(default_factory=dict)  # prepare / tune / train / final -> Slurm job id
    tunings: list[str] = field(default_factory=list)  # tune@<configuration>; none when tune.trials is 0 (or older)

    @property
    def path(self) -> Path:
        return Path(self.folder)

    def stages_of(self, part: str) -> list[str]:
        """The stages of an array, one per task: the tunings or the trainings."""
        return self.tunings if part == TUNE else self.trainings

    def array_of(self, stage: str) -> str | None:
        """The array (TUNE or TRAIN) whose task runs `stage`; None for prepare and final."""
        return next((part for part in (TUNE, TRAIN) if stage in self.stages_of(part)), None)

    def job_of(self, stage: str) -> str:
        """Slurm's id of the job that runs `stage`: <array>_<task> for an array task; "?" before submission."""
        part = self.array_of(stage)
        if part is None:
            return self.jobs.get(stage, "?")
        return f"{self.jobs.get(part, '?')}_{self.stages_of(part).index(stage)}"

    def log_file(self, stage: str) -> Path:
        """Slurm's output file of the job that runs `stage` (known once the job is submitted)."""
        part = self.array_of(stage)
        if part is not None:
            return self.path / "logs" / f"{part}-{self.jobs.get(part, '%A')}_{self.stages_of(part).index(stage)}.out"
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
    """The study of the current commit: every (configuration, seed) of params.yaml is a training job and,
    when tune.trials > 0, every configuration a tuning job before them."""
    from aevae.tracking.store import tracking_uri

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
                 tracking_uri=tracking_uri(), setup=setup or default_setup(),
                 tunings=[f"tune@{config}" for config in params.models] if params.tune.get("trials", 0) else [])

