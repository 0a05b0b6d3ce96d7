"""A training that parallel queue workers start at the same moment runs once.

DVC's run-cache restores a training done before, but only one that had *ended* when DVC looked: two
queue workers that start experiments sharing an untrained configuration (same `lr`, different
`models.vae.beta`) both miss it and both train the same AE (bench/results.md, Sweeps: trainings
run). Here the first worker to start a configuration holds a lock on it while it trains;
a worker that starts the same configuration meanwhile waits on the lock, and the first publishes its
outputs for it to copy, byte for byte, as DVC's run-cache would have restored them. Only a worker that
waited reuses outputs: a training that finds the configuration free always trains (`dvc repro -f`
retrains), and one that nobody waited for publishes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from aevae.files.model_dir import ModelDir
from aevae.files.project import scratch_dir

log = logging.getLogger(__name__)

CODE_ROOT = Path(__file__).resolve().parents[2]
KEEP_SECONDS = 24 * 3600  # published outputs older than this are removed at the next publication


def trained_dir() -> Path:
    """Where parallel workers find each other's trainings: locks and published outputs."""
    return scratch_dir("aevae-trained")


def training_key(kind: str, fingerprint: dict[str, Any]) -> str:
    """What decides a training's outputs: the model, its params and data (`fingerprint`) and the code
    that trains it (this checkout's aevae package, all of it, and training stage, so other commits never
    share)."""
    digest = hashlib.sha256(json.dumps({"model": kind, **fingerprint}, sort_keys=True).encode())
    code = sorted((CODE_ROOT / "aevae").rglob("*.py")) + [CODE_ROOT / "stages" / "train.py"]
    for path in code:
        if path.exists():
            digest.update(path.relative_to(CODE_ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def outputs(out: ModelDir) -> list[Path]:
    """The training stage's DVC outputs (dvc.yaml: outs and plots of train_<model>)."""
    return [out.best, out.run_file, out.history]


@contextmanager
def training_once(key: str, out: ModelDir, shared: Path) -> Iterator[bool]:
    """True: this process trains `key` into `out` (and, when the block ends without an error and another
    worker waits for it, publishes the outputs in `shared`). False: another worker trained it while this
    one waited, and `out` now holds its outputs."""
    shared.mkdir(parents=True, exist_ok=True)
    lock = FileLock(shared / f"{key}.lock")
    try:
        lock.acquire(blocking=False)
        waited_since = None
    except Timeout:
        waited_since = time.time()
        (shared / f"{key}.wanted").touch()  # so the training worker publishes its outputs when it ends
        log.info("%s: another queue worker is training this same configuration now: waiting for its outputs "
                 "instead of training it twice", out.path)
        lock.acquire()
    try:
        done = shared / key / "done"
        if waited_since is not None and done.exists() and done.stat().st_mtime >= waited_since:
            for path in outputs(out):
                shutil.copy2(shared / key / path.name, path)
            log.info("%s: outputs of the identical training that just ended in another worker taken (%s)",
                     out.path, out.run_file.read_text(encoding="utf-8").strip())
            yield False
            return
        yield True
        wanted = shared / f"{key}.wanted"
        if wanted.exists():  # a copy only when someone waits for it: checkpoints are megabytes
            _publish(key, out, shared)
            wanted.unlink()
    finally:
        lock.release()


def _publish(key: str, out: ModelDir, shared: Path) -> None:
    """Copy the outputs to `shared/key` (complete or not there at all: `done` is written last)."""
    folder = shared / key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for path in outputs(out):
        shutil.copy2(path, folder / path.name)
    (folder / "done").touch()
    for old in shared.glob("*/done"):
        if time.time() - old.stat().st_mtime > KEEP_SECONDS:
            shutil.rmtree(old.parent, ignore_errors=True)
