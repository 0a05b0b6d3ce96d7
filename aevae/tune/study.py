"""The tuning stage `tune@<configuration>`: the same number of trials for every configuration, each trial
trained as the study's trainings are (aevae.train.stage.train) once per seed of tune.seeds, and judged by
the mean of its best validation losses. The test split is never read: only train.npy, val.npy and the
manifest (dvc.yaml lists exactly those).

Nothing trains twice. A trial's trainings live in a folder named by everything that decides them (their
params, data and code: aevae.train.dedupe.training_key) in DVC's tmp of the repository the user started
from, so a re-run, a killed tuning started again, or a larger tune.trials restores every trial trained
before; a killed trial resumes from its last.pt. The sampler is seeded and sees the same values in the same
order, so it asks for the same trials again: raising tune.trials from 8 to 12 trains the 4 new ones only.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from aevae.config.schema import Params
from aevae.data.load import read_manifest
from aevae.files.atomic import atomic_path, write_text
from aevae.files.model_dir import ModelDir
from aevae.files.project import scratch_dir
from aevae.train.dedupe import training_key
from aevae.train.stage import Diverged, Nested, train, training_params
from aevae.tune.params import Range, TuneParams, space_of
from aevae.tune.runs import TuningRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TunedFiles:
    """What tune@<config> writes (dvc.yaml's outs): the chosen settings, every trial, Optuna's storage."""

    root: Path
    config: str

    @property
    def chosen(self) -> Path:  # what the trainings read: {"settings": {...}, ...}
        return self.root / f"{self.config}.json"

    @property
    def trials(self) -> Path:
        return self.root / f"{self.config}.csv"

    @property
    def storage(self) -> Path:  # Optuna's RDB storage: optuna-dashboard sqlite:///tuned/<config>.db
        return self.root / f"{self.config}.db"


def trials_root() -> Path:
    """Where every trial's trainings are kept, across experiments and re-runs."""
    return scratch_dir("aevae-trials")


def _suggest(trial: Any, key: str, r: Range) -> float | int:
    if r.whole:
        return trial.suggest_int(key, int(r.low), int(r.high), log=r.log)
    return trial.suggest_float(key, float(r.low), float(r.high), log=r.log)


def tune(params: Params, settings: TuneParams, config: str, data_dir: Path, out: TunedFiles) -> dict[str, Any]:
    """Tune configuration `config`; write `out`; return what `out.chosen` holds."""
    space = space_of(config, params, settings)
    result = {"config": config, "trials": settings.trials, "settings": {}, "space": list(space),
              "protocol": settings.model_dump()}  # what the report says of it
    out.root.mkdir(parents=True, exist_ok=True)
    out.storage.unlink(missing_ok=True)
    if settings.trials == 0:  # off: the study trains at params.yaml's settings, and nothing else changes
        out.storage.touch()  # an empty SQLite database: no study
        write_text(out.trials, "number,value\n")
        write_text(out.chosen, json.dumps(result, indent=2) + "\n")
        return result
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=settings.sampler_seed, n_startup_trials=settings.startup_trials)
    # A fresh storage each run: the trials before are replayed from their folders, in order, so that the
    # storage, the sampler and the result are those of an uninterrupted tuning.
    study = optuna.create_study(study_name=config, storage=f"sqlite:///{out.storage}", sampler=sampler,
                                direction="minimize")
    data_sha256 = read_manifest(data_dir)["sha256"]  # the arrays are read by each training, not here
    rows = []
    with TuningRun(params, config, data_sha256, settings) as run:
        for number in range(settings.trials):
            trial = study.ask()
            chosen = {key: _suggest(trial, key, r) for key, r in space.items()}
            values, run_ids = _judge(params, settings, config, chosen, data_dir, run.nested(number))
            study.tell(trial, sum(values) / len(values))
            rows.append({"number": number, **chosen, "value": sum(values) / len(values),
                         **{f"value_seed{s}": v for s, v in zip(settings.seeds, values, strict=True)},
                         "run_ids": " ".join(run_ids)})
            log.info("%s trial %d/%d: %s -> %.6g", config, number + 1, settings.trials, chosen, rows[-1]["value"])
        best = study.best_trial
        run.finish(best.number, best.value, rows[best.number]["run_ids"].split())
    result.update(settings=best.params, best_trial=best.number, best_value=best.value)
    with atomic_path(out.trials) as tmp:
        pd.DataFrame(rows).assign(chosen=lambda t: t["number"] == best.number).to_csv(tmp, index=False)
    write_text(out.chosen, json.dumps(result, indent=2) + "\n")
    return result


def _judge(params: Params, settings: TuneParams, config: str, chosen: dict[str, Any], data_dir: Path,
           nested: Nested) -> tuple[list[float], list[str]]:
    """A trial's best validation loss per seed of tune.seeds (trained, or restored), and the MLflow runs."""
    base = params.model_copy(update={"epochs": settings.epochs or params.epochs})
    values, run_ids = [], []
    for seed in settings.seeds:
        out = trial_dir(base, config, chosen, seed, data_dir)
        done = out.path / "done.json"
        if done.exists():  # trained before: restored, not trained
            record = json.loads(done.read_text(encoding="utf-8"))
        else:
            try:
                value = min(row["val_loss"] for row in train(base, data_dir, out, settings=chosen, nested=nested))
            except Diverged as err:  # too high a learning rate is an answer, not an error, while tuning
                log.warning("%s", err)
                value = math.inf
            record = {"value": value, "run_id": json.loads(out.run_file.read_text(encoding="utf-8"))["run_id"]}
            write_text(done, json.dumps(record) + "\n")
        values.append(record["value"])
        run_ids.append(record["run_id"])
    return values, run_ids


def trial_dir(params: Params, config: str, chosen: dict[str, Any], seed: int, data_dir: Path) -> ModelDir:
    """The folder of one trial's training with one seed: named by its params, data and code."""
    run_params = params.for_config(config, chosen)
    data_sha256 = read_manifest(data_dir)["sha256"]
    key = training_key(config, {"params": training_params(config, seed, run_params), "data_sha256": data_sha256})
    return ModelDir.of(trials_root() / key, config, seed)
