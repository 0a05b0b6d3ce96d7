"""aevae.tracking.outbox: what a run could not log waits, in order, in pending_dir()/<run id>.jsonl, and arrives once
when the store answers again. Real stores: a dead local port (nothing listens) and a sqlite store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import mlflow
import pytest
from filelock import FileLock

from aevae.tracking.outbox import Outbox, deliver_pending, pending_dir
from aevae.tracking.store import artifact_location

STEPS = {1: 0.5, 2: 0.25, 3: 0.125}


@pytest.fixture
def point_at(monkeypatch):
    """Point MLflow at `uri` as a stage sees it: MLFLOW_TRACKING_URI, and mlflow's process-wide URI (which an
    earlier in-process test or aevae.tracking.store.open_store may have set, and which wins over the variable)."""

    def point(uri: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)

    yield point
    mlflow.set_tracking_uri(None)  # monkeypatch then restores the variable


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project root in tmp_path, so that pending_dir() is there and nothing is written in the repository."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    return tmp_path


@pytest.fixture
def dead_uri() -> str:
    """A local port nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> str:
    """One sqlite store for the module's tests (a new store's schema migration takes seconds); each test
    makes its own experiment and runs in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def store_uri(sqlite_store, point_at) -> str:
    """The store this test logs to, as MLFLOW_TRACKING_URI and mlflow's URI."""
    point_at(sqlite_store)
    return sqlite_store


@pytest.fixture
def new_run(store_uri, request):
    """Make runs in the store, in an experiment of this test (artifacts beside the store, not in the cwd)."""
    client = mlflow.MlflowClient(store_uri)
    experiment = client.create_experiment(request.node.name, artifact_location=artifact_location(store_uri))

    def make() -> str:
        return client.create_run(experiment).info.run_id

    return make


def metric_items(steps: dict[int, float] = STEPS) -> list[dict]:
    return [{"kind": "metrics", "step": step, "timestamp": 1_700_000_000_000 + step,
             "metrics": {"loss": value, "val_loss": 2 * value}} for step, value in steps.items()]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def test_items_wait_in_order_through_an_outage_and_arrive_once(project, store_uri, new_run, point_at, dead_uri):
    run_id = new_run()
    outbox = Outbox(run_id)
    assert outbox.path == project / ".dvc" / "tmp" / "mlflow-pending" / f"{run_id}.jsonl"
    checkpoint = project / "stage" / "best.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights" * 100)
    items = metric_items()
    items.insert(1, {"kind": "file", "file": outbox.keep_file(checkpoint), "artifact_path": "checkpoints"})
    copy = outbox.path.parent / run_id / "best.pt"
    checkpoint.unlink()  # the stage's folder may be gone by the time the store answers

    point_at(dead_uri)
    for item in items:
        outbox.put(item)
    start = time.monotonic()
    assert outbox.deliver() is False
    assert time.monotonic() - start < 15  # one refused connection, not MLflow's minutes of retries
    assert outbox.items() == items
    assert copy.read_bytes() == b"weights" * 100
    assert history(store_uri, run_id, "loss") == []

    point_at(store_uri)
    assert outbox.deliver() is True
    assert history(store_uri, run_id, "loss") == sorted(STEPS.items())
    assert history(store_uri, run_id, "val_loss") == [(step, 2 * value) for step, value in sorted(STEPS.items())]
    artifacts = [a.path for a in mlflow.MlflowClient(store_uri).list_artifacts(run_id, "checkpoints")]
    assert artifacts == ["checkpoints/best.pt"]
    assert not outbox.path.exists()
    assert not copy.parent.exists()
    assert outbox.deliver() is True  # nothing left: nothing sent twice
    assert history(store_uri, run_id, "loss") == sorted(STEPS.items())


def test_a_failing_item_keeps_itself_and_the_rest_in_order(project, store_uri, new_run):
    run_id = new_run()
    outbox = Outbox(run_id)
    first, second, third = metric_items()
    missing = {"kind": "file", "file": str(project / "gone.pt"), "artifact_path": None}  # the store cannot take it
    for item in (first, missing, second, third):
        outbox.put(item)
    assert outbox.deliver() is False
    assert history(store_uri, run_id, "loss") == [(first["step"], first["metrics"]["loss"])]
    assert outbox.items() == [missing, second, third]


def test_an_end_item_sets_status_and_end_time(project, store_uri, new_run):
    run_id = new_run()
    started = mlflow.MlflowClient(store_uri).get_run(run_id).info
    assert started.status == "RUNNING"
    end_time = started.start_time + 123_456
    outbox = Outbox(run_id)
    outbox.put(metric_items()[0])
    outbox.put({"kind": "end", "status": "KILLED", "end_time": end_time})
    assert outbox.deliver() is True
    ended = mlflow.MlflowClient(store_uri).get_run(run_id).info
    assert (ended.status, ended.end_time) == ("KILLED", end_time)


def test_deliver_pending_counts_runs_completed_and_still_waiting(project, store_uri, new_run):
    assert deliver_pending() == (0, 0)  # no outbox folder at all
    run_ids = [new_run(), new_run()]
    delivered = [Outbox(run_id) for run_id in run_ids]
    waiting = Outbox("0" * 32)  # a run this store does not have: the store refuses its items
    for outbox in (*delivered, waiting):
        for item in metric_items():
            outbox.put(item)
    assert len(list(pending_dir().glob("*.jsonl"))) == 3
    assert deliver_pending() == (2, 1)
    for outbox in delivered:
        assert history(store_uri, outbox.run_id, "loss") == sorted(STEPS.items())
        assert not outbox.path.exists()
    assert waiting.items() == metric_items()
    assert deliver_pending() == (0, 1)


def test_a_run_another_process_delivers_is_left_to_it(project, store_uri, new_run):
    run_id = new_run()
    outbox = Outbox(run_id)
    for item in metric_items():
        outbox.put(item)
    with FileLock(f"{outbox.path}.lock", timeout=5):
        assert outbox.deliver() is False
        assert history(store_uri, run_id, "loss") == []
        assert outbox.items() == metric_items()
    assert outbox.deliver() is True  # the lock was all that held it back
    assert history(store_uri, run_id, "loss") == sorted(STEPS.items())
