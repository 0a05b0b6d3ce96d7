"""The MLflow UI's runs table as aevae opens it: one row per experiment, its params and every model's
test scores."""

from __future__ import annotations

import json

VIEW = "aevae"  # the runs table's shared view, an experiment tag the UI reads for ?viewStateShareKey=
VIEW_TAG = f"mlflow.sharedViewState.{VIEW}"


def set_runs_view(experiment_id: str, metrics: list[str], params: list[str]) -> None:
    """The shared view VIEW: these parent-run columns, newest first."""
    import mlflow

    view = {"selectedColumns": [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in params],
            "orderByKey": "attributes.start_time", "orderByAsc": False}
    mlflow.MlflowClient().set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(view))


def ui_address(base: str, experiment_id: str) -> str:
    """Where the runs table opens with that view (the UI's default mode is GenAI's trace overview)."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW}&workflowType=machine_learning"
