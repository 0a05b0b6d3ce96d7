"""Tuning (tune:): every configuration gets the same trials on validation only, a trial trained before is
restored and never trained again (a re-run, a killed tuning started again, more trials), and the study's
trainings use the chosen settings."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from aevae import AevaeError
from aevae.config.schema import Params
from aevae.train.stage import training_params
from aevae.tune.params import check_space, load_tune_params
from tests.conftest import REPO, TINY, commit_study, merged, one_line_error, project_env, run
from tests.studies import built_once, copy_of

CONFIGS = ("ae", "vae")
TUNE = {"trials": 2, "seeds": [0, 1], "startup_trials": 1, "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}}


def runs_in(store: Path) -> pd.DataFrame:
    """Every run of the aevae experiment in the sqlite store `store`."""
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(experiment_names=["aevae"])


def trial_runs(store: Path) -> pd.DataFrame:
    runs = runs_in(store)
    return runs[runs.get("tags.aevae_trial", pd.Series(index=runs.index, dtype=object)).notna()]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return project_env(tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """A committed copy with two configurations tuned (2 trials x 2 seeds each), after one `dvc repro`; built
    once per session (tests/studies.py), read-only: a test that runs dvc in it takes a copy."""
    # One torch thread per training: with threads 0 a training takes its share of the cores, which trainings
    # of other tests running at that moment change, and the killed tuning below must equal this one bitwise.
    study = merged(TINY, {"tune": TUNE, "train": {"threads": 1}})
    return built_once(tmp_path_factory, "tuned-study",
                      lambda folder: commit_study(folder / "repo", project_env(folder), study, CONFIGS)) / "repo"


@pytest.mark.xdist_group("tuned-study")  # on the worker that builds the study, not waiting for it
@pytest.mark.slow(75)
def test_every_configuration_gets_the_same_trials_and_the_study_trains_at_the_choice(tuned):
    """Slow (~75 s) for the first tune test of a session: it builds the tuned study (eight trial trainings, two
    more, evaluate, report)."""
    runs = runs_in(tuned / "mlflow.db")
    tuning = runs[runs["tags.aevae_role"] == "tuning"]
    assert sorted(tuning["tags.tuning_config"]) == sorted(CONFIGS)
    for config in CONFIGS:
        chosen = json.loads((tuned / f"tuned/{config}.json").read_text())
        trials = pd.read_csv(tuned / f"tuned/{config}.csv")
        assert list(trials["number"]) == [0, 1] and chosen["trials"] == 2 and chosen["space"] == ["lr"]
        best = trials.loc[trials["value"].idxmin()]
        assert chosen["settings"] == {"lr": pytest.approx(best["lr"])} and best["chosen"]
        assert best["value"] == pytest.approx((best["value_seed0"] + best["value_seed1"]) / 2)
        parent = tuning[tuning["tags.tuning_config"] == config]["run_id"].item()
        nested = runs[runs["tags.mlflow.parentRunId"] == parent]
        assert len(nested) == 4 and set(nested["tags.aevae_trial"]) == {"0", "1"}  # 2 trials x 2 seeds
        assert sorted(nested[nested.get("tags.chosen") == "true"]["run_id"]) == sorted(best["run_ids"].split())
        study = runs[(runs["tags.model_config"] == config) & runs["tags.aevae_trial"].isna()]
        assert len(study) == 1 and float(study["params.lr"].item()) == pytest.approx(best["lr"])
    report = (tuned / "reports/report.md").read_text()
    assert "## Tuning" in report and "2 trials over lr 0.0001..0.01 (log scale)" in report
    assert "trained once per seed 0, 1" in report and "the test split was never read" in report
    for config in CONFIGS:  # the Training section names each model's chosen lr
        lr = json.loads((tuned / f"tuned/{config}.json").read_text())["settings"]["lr"]
        assert f"lr {lr:g}" in report
    assert (tuned / "reports/tuning.png").stat().st_size > 10_000
    mlflow.set_tracking_uri(f"sqlite:///{tuned / 'mlflow.db'}")
    from aevae.compare.runs import model_runs

    assert sorted(model_runs()["model"]) == sorted(CONFIGS)  # the study's runs, not the trials


def tune_stage(repo: Path, root: Path, config: str, env: dict[str, str]) -> subprocess.Popen:
    """stages/tune.py of `repo` for `config`, with `root` as the project (its own trials, its own store)
    and a data folder holding only the train and validation arrays and the manifest."""
    data = root / "data"
    if not data.exists():
        data.mkdir(parents=True)
        for name in ("train.npy", "val.npy", "manifest.json"):  # no test.npy: tuning never opens it
            shutil.copy(repo / "data/prepared" / name, data / name)
    return subprocess.Popen([sys.executable, repo / "stages/tune.py", "--model", config, "--params",
                             repo / "params.yaml", "--data", data, "--out", root / "tuned"], cwd=root,
                            env={**env, "DVC_ROOT": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'm.db'}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.xdist_group("tuned-study")  # on the worker that builds the study, not waiting for it
@pytest.mark.slow(25)
def test_without_the_test_split_killed_and_started_again_the_tuning_equals_an_uninterrupted_one(tuned, env,
                                                                                                tmp_path):
    """SIGKILL once the first trial has finished, then the same command: no finished trial trains again,
    and the choice and every trial's value equal those of the uninterrupted tuning in `tuned`."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]["deps"]
    assert not [d for d in deps if d.startswith("data/prepared") and d.split("/")[-1] not in
                ("train.npy", "val.npy", "manifest.json")]
    proc = tune_stage(tuned, tmp_path, "vae", env)
    deadline = time.monotonic() + 300
    while not list((tmp_path / ".dvc/tmp/aevae-trials").glob("*/vae/seed*/done.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in (tmp_path / ".dvc/tmp/aevae-trials").glob("*/vae/seed*/done.json")}
    again = tune_stage(tuned, tmp_path, "vae", env)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())  # restored, not trained
    assert json.loads((tmp_path / "tuned/vae.json").read_text()) == json.loads((tuned / "tuned/vae.json").read_text())
    ours, theirs = (pd.read_csv(p / "tuned/vae.csv").drop(columns="run_ids") for p in (tmp_path, tuned))
    pd.testing.assert_frame_equal(ours, theirs)  # every trial's value, bit for bit
    trials = trial_runs(tmp_path / "m.db")
    assert len(trials) == 4 and set(trials["status"]) == {"FINISHED"}  # each (trial, seed) one run, resumed


@pytest.mark.xdist_group("tuned-study")  # on the worker that builds the study, not waiting for it
@pytest.mark.slow(75)
def test_more_trials_train_only_the_new_ones_and_a_repeat_trains_nothing(tuned, env, tmp_path):
    """A third trial, then the same command again, in a copy of the tuned study. Slow (~75 s): four trial
    trainings, the study's trainings at the new choice, evaluate and report."""
    repo = copy_of(tuned, tmp_path / "repo")
    before = set(trial_runs(repo / "mlflow.db")["run_id"])
    run(["dvc", "exp", "run", "-S", "tune.trials=3"], repo, env)
    trials = trial_runs(repo / "mlflow.db")
    added = trials[~trials["run_id"].isin(before)]
    assert sorted(added["tags.aevae_trial"]) == ["2", "2", "2", "2"]  # trial 2 of each configuration, 2 seeds
    for config in CONFIGS:
        assert len(pd.read_csv(repo / f"tuned/{config}.csv")) == 3
    count = len(runs_in(repo / "mlflow.db"))
    out = run(["dvc", "exp", "run", "-S", "tune.trials=3"], repo, env).stdout
    assert "Running stage 'tune@" not in out and len(runs_in(repo / "mlflow.db")) == count


def test_no_trials_choose_nothing_and_train_exactly_as_before(tmp_path):
    """tune.trials: 0 (the default): the trainings' params, and so their fingerprint, are params.yaml's."""
    from aevae.tune.study import TunedFiles, tune

    params = Params()
    chosen = tune(params, load_tune_params(REPO / "params.yaml"), "vae", tmp_path, TunedFiles(tmp_path, "vae"))
    assert chosen["settings"] == {} and chosen["trials"] == 0
    assert params.for_config("vae", chosen["settings"]) == params
    assert training_params("vae", 0, params.for_config("vae", {})) == training_params("vae", 0, params)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"learning_rate": {"low": 0.1, "high": 1.0}}, "tune.space.learning_rate: not a training setting"),
        ({"lr": {"low": 0.01, "high": 0.001}}, "tune.space.lr: low (0.01) must be below high (0.001)"),
        ({"lr": {"low": 0.0, "high": 0.01, "log": True}}, "tune.space.lr: a log range needs low > 0"),
        ({"batch_size": {"low": 16.0, "high": 64.0}}, "tune.space.batch_size: low and high must be whole numbers"),
        ({"lr": {"low": 0.001}}, "tune.space.lr.high: Field required"),
    ],
)
def test_a_bad_space_is_a_one_line_error_naming_the_key(tmp_path, space, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tune"] = {"trials": 2, "space": space}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(AevaeError) as err:
        check_space(Params.model_validate({k: v for k, v in params.items() if k != "tune"}), load_tune_params(path),
                    path)
    assert message in str(err.value) and "\n" not in str(err.value)
    result = subprocess.run([sys.executable, REPO / "stages/tune.py", "--model", "vae", "--params", path, "--data",
                             tmp_path, "--out", tmp_path / "tuned"], capture_output=True, text=True, cwd=tmp_path)
    one_line_error(result, message)
    assert not (tmp_path / "tuned").exists()
