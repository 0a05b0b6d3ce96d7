"""What a training sends to MLflow as it goes: each epoch's metrics, progress images, and at the end its
best checkpoint, history and MLflow model; through the run's outbox, so an outage delays them."""

from __future__ import annotations

import logging
from typing import Any

from aevae.files.model_dir import ModelDir
from aevae.models.contract import Model
from aevae.tracking.outbox import Outbox, now_ms
from aevae.tracking.store import fail_fast, tracking_uri

log = logging.getLogger(__name__)


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


def log_images(images: dict[str, Any], step: int) -> None:
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

    from aevae.tracking.model import log_model

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
