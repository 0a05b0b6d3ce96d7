"""Two queue workers that start the same untrained configuration at once train it once (aevae.train.dedupe)."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from tests.conftest import REPO, project_env, train_command

pytestmark = pytest.mark.slow


def test_two_workers_starting_one_configuration_train_it_once(tmp_path, write_params, store):
    params = write_params({"epochs": 12, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 200},
                           "tracking": {"images_every": 0, "system_metrics": False}})
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=store, DVC_ROOT=str(tmp_path))  # as DVC sets it in queue workers
    subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), "--params", params, "--out", "prepared"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)

    def worker(name: str) -> subprocess.Popen:
        """The training stage in a workspace of its own, as in DVC's temporary experiment copies."""
        (tmp_path / name).mkdir()
        return subprocess.Popen(train_command(params, tmp_path / "prepared", "models"),
                                cwd=tmp_path / name, env=env, stderr=subprocess.PIPE, text=True)

    first, second = worker("w1"), worker("w2")  # started together, as `dvc queue start -j 2` does
    logs = [p.communicate(timeout=600)[1] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], "\n".join(logs)
    assert sum("waiting for its outputs instead of training it twice" in log for log in logs) == 1, logs
    for name in ("best.pt", "run.json", "history.csv"):
        first, second = (tmp_path / w / "models/ae/seed0" / name for w in ("w1", "w2"))
        assert first.read_bytes() == second.read_bytes()
    mlflow.set_tracking_uri(store)  # this test's store: an earlier in-process test may have set another
    runs = mlflow.search_runs(experiment_names=["aevae"], filter_string="tags.aevae_role = 'stage'")
    assert len(runs) == 1 and runs["status"].tolist() == ["FINISHED"], logs

    published = list((tmp_path / ".dvc/tmp/aevae-trained").glob("*/done"))
    assert len(published) == 1
    stamp = published[0].stat().st_mtime_ns

    # A training that finds its configuration free trains, even one trained before (`dvc repro -f`),
    # and publishes nothing: no one waited for it.
    third = worker("w3")
    log = third.communicate(timeout=600)[1]
    assert third.returncode == 0 and "waiting" not in log, log
    runs = mlflow.search_runs(experiment_names=["aevae"], filter_string="tags.aevae_role = 'stage'")
    assert len(runs) == 2
    assert published[0].stat().st_mtime_ns == stamp
