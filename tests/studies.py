"""Studies built once per test session and shared: a tiny `dvc repro` costs about a minute of CPU, and a
dozen tests only read what it wrote, or need a study to start from.

`built_once` builds a folder the first time any test asks for it in a session, also across pytest-xdist
workers (a file lock beside it: the others wait, then read). The folder is read-only by convention: a test
that reads it runs no command in it (dvc, git and MLflow write even when they only look). A test that
changes a study, or runs dvc or aevae in it, takes `copy_of(built, tmp_path / ...)`: its own copy, so it
passes alone and in any order, and leaves nothing for the next test.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

# The MLflow columns that hold an absolute path of the store's folder (its artifacts sit beside it).
MLFLOW_PATHS = {"experiments": "artifact_location", "runs": "artifact_uri", "logged_models": "artifact_location"}


def session_folder(factory: pytest.TempPathFactory) -> Path:
    """The folder every worker of this session shares (pytest-xdist gives each worker its own base temp)."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """`session folder/name`, made by `build(folder)` the first time a test of this session asks for it. A
    build that failed is tried again by the next test that asks (and fails it again, with its own error)."""
    folder = session_folder(factory) / name
    done = folder.with_name(f"{name}.built")
    with FileLock(str(folder.with_name(f"{name}.lock"))):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


def copy_of(study: Path, dst: Path) -> Path:
    """A copy of `study` at `dst` that works on its own: git, DVC's cache and state, and the MLflow store,
    whose artifact paths (absolute, MLflow's way) are moved to the copy's own mlartifacts/. The run.json
    files of the trainings keep the store they were written for: DVC tracks them, and aevae reads only
    their run id."""
    shutil.copytree(study, dst, symlinks=True)
    store = dst / "mlflow.db"
    if store.exists():
        old, new = f"{study.resolve()}/", f"{dst.resolve()}/"  # in plain paths and file:// URIs alike
        with sqlite3.connect(store) as db:
            for table, column in MLFLOW_PATHS.items():
                db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (old, new))
        db.close()
    return dst
