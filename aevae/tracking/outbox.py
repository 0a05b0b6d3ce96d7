"""A run's outbox: what a training sends to MLflow waits here, so that a tracking server's outage delays
it instead of stopping the training (aevae.tracking.training_log puts the items in).

Each item (an epoch's metrics, a file, the model, the run's end) is appended to the run's outbox,
pending_dir()/<run id>.jsonl, and delivered oldest first; what the store does not take stays there, in
order, for the next epoch, the next stage or `aevae sync`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from aevae.files.atomic import write_text
from aevae.files.project import scratch_dir
from aevae.tracking.store import fail_fast, open_store, tracking_uri

log = logging.getLogger(__name__)


def pending_dir() -> Path:
    """Where MLflow items a training could not deliver wait: in the repository the user started from (a
    queued experiment's temporary copy is deleted when it ends)."""
    return scratch_dir("mlflow-pending")


def now_ms() -> int:
    return int(time.time() * 1000)


class Outbox:
    """What a run could not log yet, in order: one JSON line per item in pending_dir()/<run id>.jsonl; files
    are copied beside it. `deliver` sends the items oldest first and keeps whatever the store did not take,
    so every epoch arrives, in order, once; a request that failed after the server stored it (a timeout at
    the wrong moment) would be sent again, which for metrics adds a duplicate point at the same step."""

    def __init__(self, run_id: str, folder: Path | None = None) -> None:
        self.run_id = run_id
        self.path = (folder or pending_dir()) / f"{run_id}.jsonl"

    def items(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def put(self, item: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(item) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def keep_file(self, path: Path) -> str:
        """A copy of `path` that outlives the stage's folder, for a later delivery."""
        copy = self.path.parent / self.run_id / path.name  # the name the artifact keeps
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        return str(copy)

    def deliver(self) -> bool:
        """Send every item, oldest first; True when nothing is left. One sender at a time: another
        process delivering this run already is left to it."""
        from filelock import FileLock, Timeout

        if not self.path.exists():
            return True
        try:
            with FileLock(f"{self.path}.lock", timeout=0):
                return self._deliver_all()
        except Timeout:
            return False

    def _deliver_all(self) -> bool:
        items = self.items()
        done = 0
        try:
            with fail_fast():
                for item in items:
                    _deliver(self.run_id, item)
                    done += 1
        except Exception as err:  # any failure of the store: keep the rest, in order, for later
            log.debug("MLflow delivery for run %s stopped: %s", self.run_id, err)
        if done == len(items):
            shutil.rmtree(self.path.parent / self.run_id, ignore_errors=True)
            self.path.unlink(missing_ok=True)
            return True
        write_text(self.path, "".join(json.dumps(item) + "\n" for item in items[done:]))
        return False


def _deliver(run_id: str, item: dict[str, Any]) -> None:
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    if item["kind"] == "metrics":
        metrics = [Metric(k, v, item["timestamp"], item["step"]) for k, v in item["metrics"].items()]
        client.log_batch(run_id, metrics=metrics)
    elif item["kind"] == "file":
        client.log_artifact(run_id, item["file"], artifact_path=item["artifact_path"])
    elif item["kind"] == "model":
        from aevae.models.checkpoints import load_model
        from aevae.tracking.model import log_model

        with mlflow.start_run(run_id=run_id):
            log_model(load_model(Path(item["file"]))[0])
    elif item["kind"] == "end":
        client.set_terminated(run_id, status=item["status"], end_time=item["end_time"])


def deliver_pending() -> tuple[int, int]:
    """Send what earlier stages could not; (runs completed, runs still waiting)."""
    folder = pending_dir()
    waiting = sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if folder.exists() else []
    if not waiting:
        return 0, 0
    open_store()
    left = sum(not Outbox(path.stem).deliver() for path in waiting)
    return len(waiting) - left, left


def end_run(outbox: Outbox, status: str) -> None:
    """The run's end, as the last item of its outbox; then the fluent run (and its system metrics
    sampler) is closed, which sets the same status again, or fails harmlessly while the store is away."""
    import mlflow

    outbox.put({"kind": "end", "status": status, "end_time": now_ms()})
    delivered = outbox.deliver()
    try:
        with fail_fast():
            mlflow.end_run(status=status)
    except Exception as err:
        log.debug("end_run: %s", err)
    if not delivered:
        log.warning("MLflow at %s is unreachable: %d item(s) of run %s (the last: its %s status) wait in %s; "
                    "the next aevae stage sends them, or `aevae sync` once the server is back",
                    tracking_uri(), len(outbox.items()), outbox.run_id, status, outbox.path)

