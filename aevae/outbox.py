"""What a training sends to MLflow, through a per-run outbox, so that a tracking server's outage delays
it instead of stopping the training.

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
from typing import TYPE_CHECKING, Any

from aevae.files import ModelDir, pending_dir, write_text
from aevae.store import fail_fast, open_store, tracking_uri

if TYPE_CHECKING:
    from PIL import Image

    from aevae.models import Model

log = logging.getLogger(__name__)


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
        from aevae.checkpoints import load_model
        from aevae.mlflow_model import log_model

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


def log_epoch(row: dict[str, float]) -> None:
    """One epoch's history row as metrics of the active run, at step = epoch; through the run's outbox,
    so that an unreachable store delays it instead of stopping the training."""
    import mlflow

    outbox = Outbox(mlflow.active_run().info.run_id)
    was_waiting = outbox.path.exists()
    outbox.put({"kind": "metrics", "step": int(row["epoch"]), "timestamp": now_ms(),
                "metrics": {k: v for k, v in row.items() if k != "epoch"}})
    if outbox.deliver():
        if was_waiting:
            log.warning("MLflow at %s answers again: the epochs it missed were delivered", tracking_uri())
    elif not was_waiting:
        log.warning("MLflow at %s does not answer: training goes on, its metrics wait in %s and are sent, in "
                    "order, when it answers again", tracking_uri(), outbox.path)


def log_images(images: dict[str, Image.Image], step: int) -> None:
    """Figures of the training as it goes, each under its key with its epoch, for MLflow's image view.
    They illustrate the metrics and are not kept for later: during an outage they are skipped."""
    import mlflow

    try:
        with fail_fast():
            for key, image in images.items():
                mlflow.log_image(image, key=key, step=step, synchronous=True)
    except Exception as err:  # the store is away: the metrics are what must arrive
        log.warning("images of epoch %d not logged to MLflow (%s)", step, str(err).splitlines()[0])


def log_trained_model(out: ModelDir, best_val: float, model: Model) -> None:
    """The best checkpoint, its history, and the model as an MLflow model (`runs:/<run id>/model`); what
    the store does not take now goes to the run's outbox, before the run's end."""
    import mlflow

    from aevae.mlflow_model import log_model

    outbox = Outbox(mlflow.active_run().info.run_id)
    outbox.put({"kind": "metrics", "step": 0, "timestamp": now_ms(), "metrics": {"best_val_loss": best_val}})
    best = outbox.keep_file(out.best)
    outbox.put({"kind": "file", "file": best, "artifact_path": "checkpoints"})
    outbox.put({"kind": "file", "file": outbox.keep_file(out.history), "artifact_path": None})
    if outbox.deliver():
        try:
            with fail_fast():
                log_model(model)
            return
        except Exception as err:  # the store went away between the two
            log.debug("logging the model failed: %s", err)
        best = outbox.keep_file(out.best)  # delivering cleared the copy
    outbox.put({"kind": "model", "file": best})
