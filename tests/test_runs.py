import subprocess
import sys
import time

import mlflow
import pytest

from aevae import AevaeError
from aevae.tracking import runs, store
from tests.conftest import project_env

WRITER = """
import sys
import mlflow
from aevae.tracking import runs
n = int(sys.argv[1])
with runs.start_run(f"w{n}", {"worker": n}, {"kind": "load"}):
    for step in range(25):
        mlflow.log_metrics({"a": float(step), "b": float(n)}, step=step)
"""


def test_store_is_at_the_dvc_root_even_inside_a_temporary_experiment_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    monkeypatch.chdir(tmp_path)  # a stage of `dvc exp run --temp` runs in a copy elsewhere
    assert store.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.tracking_uri() == "http://127.0.0.1:5000"


def test_artifacts_go_next_to_a_sqlite_store(tmp_path):
    assert store.artifact_location(f"sqlite:///{tmp_path}/x/mlflow.db") == (tmp_path / "x" / "mlartifacts").as_uri()
    assert store.artifact_location("http://127.0.0.1:5000") is None


def test_parallel_writers_on_a_new_store_lose_nothing(tmp_path):
    """Queue workers starting at once on a fresh sqlite store (the schema migration race)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=uri)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(n)], env=env, stderr=subprocess.PIPE, text=True)
             for n in range(5)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(experiment_names=[store.EXPERIMENT])
    assert sorted(found["tags.mlflow.runName"]) == [f"w{n}" for n in range(5)]
    assert set(found["status"]) == {"FINISHED"}
    client = mlflow.MlflowClient(uri)
    assert all(len(client.get_metric_history(r, "a")) == 25 for r in found["run_id"])


def test_a_run_is_marked_failed_when_its_body_raises(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ValueError), runs.start_run("boom", {}, {}) as run:
        raise ValueError("x")
    assert mlflow.MlflowClient(uri).get_run(run.info.run_id).info.status == "FAILED"


def test_resume_run_needs_the_run_file(tmp_path):
    with pytest.raises(AevaeError, match="run the training stages first"), runs.resume_run(tmp_path / "run.json"):
        pass


def test_logging_into_a_finished_run_keeps_its_status_and_duration(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with runs.start_run("ae", {}, {}) as run:
        pass
    runs.write_run_file(tmp_path / "run.json", run)
    client = mlflow.MlflowClient(uri)
    trained = client.get_run(run.info.run_id).info
    # A failing evaluation must not mark the training FAILED.
    with pytest.raises(RuntimeError), runs.resume_run(tmp_path / "run.json"):
        mlflow.log_metric("test_psnr", 25.0)
        time.sleep(0.05)
        raise RuntimeError("evaluation failed")
    after = client.get_run(run.info.run_id)
    assert trained.status == "FINISHED"
    assert (after.info.status, after.info.end_time) == (trained.status, trained.end_time)
    assert after.data.metrics["test_psnr"] == 25.0


@pytest.mark.parametrize(("error", "status"),
                         [(KeyboardInterrupt, "KILLED"), (ValueError, "FAILED"), (None, "FINISHED")])
def test_every_run_ends_with_the_status_of_how_its_block_ended(tmp_path, monkeypatch, error, status):
    """A real MLflow run records how its block ended, and the error goes on up: never swallowed."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if error:
        with pytest.raises(error, match="the block's own error"), runs.start_run("r", {"p": 1}, {}) as run:
            raise error("the block's own error")
    else:
        with runs.start_run("r", {"p": 1}, {}) as run:
            pass
    ended = mlflow.MlflowClient().get_run(run.info.run_id).info
    assert (ended.status, ended.end_time is not None) == (status, True)
    assert mlflow.active_run() is None
