"""Training outlives its tracking server: a real `mlflow server` killed mid-training and started again."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from aevae.config.load import load_params
from aevae.data.prepare import prepare
from tests.conftest import REPO, one_line_error, project_env, train_command

pytestmark = pytest.mark.slow(30)

EPOCHS = 20


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return project_env(tmp_path)


def history_rows(path: Path) -> int:
    try:
        return len(pd.read_csv(path))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def wait_for_epoch(training: subprocess.Popen, history: Path, epoch: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (rows := history_rows(history)) >= epoch:
            return rows
        assert training.poll() is None, "the training ended before the epoch the test waits for"
        time.sleep(0.05)
    raise AssertionError(f"epoch {epoch} not reached in {timeout} s")


@pytest.mark.slow(90)
def test_metrics_survive_two_outages_and_arrive_in_order(tmp_path, env, write_params, tracking_server):
    """Outage 1 ends during training: the missed epochs arrive with the next one. Outage 2 lasts past the
    training's end: the stage warns, and `aevae sync` delivers the rest, the model and the FINISHED."""
    params = write_params({"epochs": EPOCHS, "batch_size": 32, "data": {"image_size": 32, "builtin_size": 400},
                           "tracking": {"images_every": 2}})
    subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), "--params", params, "--out", "prepared"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    env = {**env, "MLFLOW_TRACKING_URI": tracking_server.uri}
    history = tmp_path / "models/ae/seed0/history.csv"
    training = subprocess.Popen(train_command(params, "prepared", "models"), cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        down_at = wait_for_epoch(training, history, 2)
        tracking_server.kill()
        outage_start = time.monotonic()
        wait_for_epoch(training, history, down_at + 3)
        tracking_server.start()
        back_at = history_rows(history)
        outage_seconds = time.monotonic() - outage_start
        wait_for_epoch(training, history, EPOCHS - 3)
        tracking_server.kill()  # outage 2: until after the training ends
        _, stderr = training.communicate(timeout=600)
    finally:
        training.kill()
    assert training.returncode == 0, stderr[-3000:]
    assert "does not answer: training goes on" in stderr and "answers again" in stderr
    # The end-of-stage warning: after the last epoch, the FINISHED status waits, and says how to send it.
    lines = stderr.splitlines()
    last_epoch = max(i for i, line in enumerate(lines) if f"epoch {EPOCHS}/{EPOCHS}" in line)
    (warning,) = [line for line in lines[last_epoch:] if "is unreachable" in line]
    assert "its FINISHED status" in warning and "aevae sync" in warning
    pending = list((tmp_path / ".dvc/tmp/mlflow-pending").glob("*.jsonl"))
    assert len(pending) == 1

    tracking_server.start()
    synced = subprocess.run([sys.executable, "-c", "from aevae.commands.main import main; main()", "sync"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert "1 run(s) completed" in synced.stdout
    assert not list((tmp_path / ".dvc/tmp/mlflow-pending").glob("*.jsonl"))

    run_id = json.loads((tmp_path / "models/ae/seed0/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))  # every epoch, once
    written = pd.read_csv(history)["train_loss"].tolist()
    logged = [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]
    assert logged == pytest.approx(written, rel=1e-12)
    assert "checkpoints/best.pt" in {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    # The progress images of an epoch the server missed are skipped, with a warning, and never sent later:
    # every second epoch's picture is either in the run or named as skipped, and some were skipped (each
    # outage lasts three epochs or more).
    skipped = {int(n) for n in re.findall(r"images of epoch (\d+) not logged to MLflow", stderr)}
    logged = [int(re.search(r"\+step\+(\d+)\+", a.path).group(1)) for a in client.list_artifacts(run_id, "images")
              if a.path.endswith(".png")]
    assert skipped and not skipped & set(logged) and len(logged) == len(set(logged))
    assert skipped | set(logged) == set(range(2, EPOCHS + 1, 2)), (sorted(skipped), sorted(logged))
    mlflow.set_tracking_uri(tracking_server.uri)
    assert mlflow.models.get_model_info(f"runs:/{run_id}/model").metadata["aevae_kind"] == "ae"
    print(f"outage 1: server down after epoch {down_at} for {outage_seconds:.1f} s, {back_at - down_at} epochs "
          f"ended meanwhile; outage 2 from epoch {EPOCHS - 3} past the end; all {EPOCHS} epochs arrived once")


@pytest.mark.slow(8)
def test_a_server_that_is_down_when_training_starts_is_a_one_line_error_before_any_epoch(tmp_path, env,
                                                                                        write_params):
    params = write_params({"data": {"image_size": 32, "builtin_size": 60}})
    prepare(load_params(params).data, seed=0, out=tmp_path / "prepared")
    with socket.socket() as free:  # a port nothing listens on: the server is down
        free.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{free.getsockname()[1]}"
    start = time.monotonic()
    result = subprocess.run(train_command(params, "prepared", "models"), cwd=tmp_path, capture_output=True, text=True,
                            env={**env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"})
    seconds = time.monotonic() - start
    one_line_error(result, f"Error: cannot log to the MLflow store: MLflow at {uri} does not answer (connection "
                           "refused); start the server")
    assert not [p.name for p in (tmp_path / "models").rglob("*") if p.is_file()]  # no epoch ran
    # Three tries (MLflow's waits between them shortened here): not MLflow's seven, minutes apart.
    assert result.stderr.count("Retrying (Retry(") == 2, result.stderr[-2000:]
    assert seconds < 60, f"{seconds:.0f} s before the error: MLflow's client retried for minutes"
