"""A tuning stage in MLflow: one run per configuration under the pipeline's parent run, with the trials'
training runs nested under it (tagged with their number, value, and whether chosen), apart from the
study's training runs."""

from __future__ import annotations

import logging
from typing import Any

from aevae.config.schema import Params
from aevae.tracking.provenance import Pipeline
from aevae.tracking.runs import ROLE, TRIAL, pipeline_stage
from aevae.tracking.store import EXPERIMENT, open_store
from aevae.train.stage import Nested
from aevae.tune.params import TuneParams

log = logging.getLogger(__name__)


class TuningRun:
    """`with TuningRun(...) as run:` the tuning run of one configuration, RUNNING meanwhile, then FINISHED,
    or FAILED/KILLED as the stage ends."""

    def __init__(self, params: Params, config: str, data_sha256: str, settings: TuneParams) -> None:
        self.pipeline = Pipeline.of(params.flat(), data_sha256)
        self.config, self.settings = config, settings
        self._stage = pipeline_stage(self.pipeline)
        self.run_id = ""

    def __enter__(self) -> TuningRun:
        parent = self._stage.__enter__()
        mlflow = open_store()
        self.client = mlflow.MlflowClient()
        experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
        run = self.client.create_run(experiment, run_name=f"tune-{self.config}", tags={
            **self.pipeline.tags, ROLE: "tuning", "tuning_config": self.config, "mlflow.parentRunId": parent})
        self.run_id = run.info.run_id
        for key, value in self.settings.model_dump(exclude={"space"}).items():
            self.client.log_param(self.run_id, f"tune.{key}", value)
        for key, r in self.settings.space.items():
            self.client.log_param(self.run_id, f"tune.space.{key}", f"{r.low}..{r.high}{' log' if r.log else ''}")
        return self

    def nested(self, number: int) -> Nested:
        """Where trial `number`'s trainings log."""
        return Nested(self.run_id, {**self.pipeline.tags, TRIAL: str(number)})

    def finish(self, best: int, value: float, run_ids: list[str]) -> None:
        """Tag the chosen trial on the tuning run and on its training runs."""
        self.client.set_tag(self.run_id, "best_trial", str(best))
        self.client.log_metric(self.run_id, "best_value", value)
        for run_id in run_ids:
            self.client.set_tag(run_id, "chosen", "true")

    def __exit__(self, kind: Any, error: Any, trace: Any) -> bool | None:
        status = "FINISHED" if kind is None else "KILLED" if kind and issubclass(kind, KeyboardInterrupt) else "FAILED"
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:  # the stage's own outcome matters more than the run's status
            log.warning("MLflow: tuning run %s not marked %s (%s)", self.run_id, status, str(err).splitlines()[0])
        return self._stage.__exit__(kind, error, trace)
