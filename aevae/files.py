"""Where outputs go, and writing them so that a crash or a full disk never leaves a half-written file."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from aevae import AevaeError


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise AevaeError(f"cannot write {path}: {err.strerror or err}; check free space and permissions "
                         "(the previous version of the file is untouched)") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- the repository's own state


def installed_file(distribution: str, version: str, path: str) -> Path | None:
    """A file shipped by an installed PyPI distribution of exactly `version`, found from its metadata
    without importing it (the weight packages import jax or cv2); None when it is absent or another version."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file(path)) if dist.version == version else None


def project_root() -> Path:
    """The repository the user started from, also inside `dvc exp run --temp` and queue workers."""
    # DVC points DVC_ROOT at the parent repo even when the stage runs in a temporary copy of it.
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def pending_dir() -> Path:
    """Where MLflow items a training could not deliver wait (aevae.outbox): in the repository the user
    started from (a queued experiment's temporary copy is deleted when it ends), in DVC's git-ignored tmp."""
    return project_root() / ".dvc" / "tmp" / "mlflow-pending"


def trained_dir() -> Path:
    """Where parallel workers find each other's trainings (aevae.once): locks and published outputs."""
    return project_root() / ".dvc" / "tmp" / "aevae-trained"


# --------------------------------------------------------------------------- where stages put things
# The folders come from dvc.yaml (each stage's cmd); the names of the files inside them are set here only.


@dataclass(frozen=True)
class ModelDir:
    """One training's output folder, <models>/<configuration>/seed<seed> (dvc.yaml's train stage)."""

    path: Path

    @classmethod
    def of(cls, root: Path, config: str, seed: int) -> ModelDir:
        return cls(Path(root) / config / f"seed{seed}")

    @property
    def config(self) -> str:  # the model configuration's name: params.yaml models.<config>
        return self.path.parent.name

    @property
    def seed(self) -> int:
        name = self.path.name
        if not (name.startswith("seed") and name[4:].lstrip("-").isdigit()):
            raise AevaeError(f"{self.path}: a training folder is <models>/<configuration>/seed<N>")
        return int(name[4:])

    @property
    def best(self) -> Path:  # weights of the best validation epoch: what evaluation scores
        return self.path / "best.pt"

    @property
    def last(self) -> Path:  # the full training state after the last complete epoch: what a restart resumes
        return self.path / "last.pt"

    @property
    def history(self) -> Path:  # one row of losses per epoch
        return self.path / "history.csv"

    @property
    def run_file(self) -> Path:  # the MLflow run that trained it
        return self.path / "run.json"


@dataclass(frozen=True)
class MetricsDir:
    """The evaluation stage's output folder."""

    path: Path

    @property
    def eval_json(self) -> Path:  # DVC metrics: mean test scores per model
        return self.path / "eval.json"

    @property
    def per_image(self) -> Path:
        return self.path / "per_image.csv"

    @property
    def summary(self) -> Path:  # means, intervals and paired differences
        return self.path / "summary.csv"

    @property
    def per_seed(self) -> Path:  # each training's test means, one row per (model, seed)
        return self.path / "per_seed.csv"

    def reconstructions(self, config: str, seed: int) -> Path:
        return self.path / "reconstructions" / config / f"seed{seed}.npy"

    @property
    def inception_test(self) -> Path:  # the `features` stage's output: the test images' Inception features
        return self.path / "inception" / "test"

    @property
    def inception_models(self) -> Path:  # every training's reconstruction and sample features (evaluate)
        return self.path / "inception" / "models"
