"""One training's output folder, <models>/<configuration>/seed<seed>: the names of the files in it.

The folder comes from dvc.yaml (the train stage's cmd); the names of the files inside are set here only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aevae import AevaeError


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
    def last(self) -> Path:  # the full training state after the last complete epoch (or batch, when stopped)
        return self.path / "last.pt"

    @property
    def history(self) -> Path:  # one row of losses per epoch
        return self.path / "history.csv"

    @property
    def run_file(self) -> Path:  # the MLflow run that trained it
        return self.path / "run.json"
