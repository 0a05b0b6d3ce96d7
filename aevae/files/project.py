"""The repository the user started from: where its MLflow store and its shared scratch folders live."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """The repository the user started from, also inside `dvc exp run --temp` and queue workers."""
    # DVC points DVC_ROOT at the parent repo even when the stage runs in a temporary copy of it.
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def scratch_dir(name: str) -> Path:
    """A folder of the repository the user started from, in DVC's git-ignored tmp: what must outlive a
    queued experiment's temporary copy (deleted when it ends) or be seen by parallel workers."""
    return project_root() / ".dvc" / "tmp" / name
