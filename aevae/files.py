"""Where outputs go, and writing them so that a crash or a full disk never leaves a half-written file."""

from __future__ import annotations

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


# --------------------------------------------------------------------------- where stages put things
# The folders come from dvc.yaml (each stage's cmd); the names of the files inside them are set here only.


@dataclass(frozen=True)
class ModelDir:
    """A training stage's output folder: the model's name is the folder's name."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

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

    def reconstructions(self, model: str) -> Path:
        return self.path / "reconstructions" / f"{model}.npy"
