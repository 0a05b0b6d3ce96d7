"""Two queue workers that start the same untrained configuration at once train it once (aevae.train.dedupe)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from tests.conftest import REPO, project_env, train_command, wait_for_epoch

pytestmark = pytest.mark.slow(20)
WAITING = "waiting for its outputs instead of training it twice"


@pytest.mark.slow(30)
def test_two_workers_starting_one_configuration_train_it_once(tmp_path, write_params, store):
    """Slow (~30 s): real training processes, two of them at once and a third after."""
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

    # Copies published by earlier trainings, both of files trained 25 hours ago (copy2 keeps their times): one
    # published then, one just now. A copy's age is that of its `done`, written last when it is published.
    shared = tmp_path / ".dvc/tmp/aevae-trained"
    day_ago = time.time() - 25 * 3600
    for copy in ("old-copy", "recent-copy"):
        (shared / copy).mkdir(parents=True)
        (shared / copy / "best.pt").write_bytes(b"published weights")
        os.utime(shared / copy / "best.pt", (day_ago, day_ago))
        (shared / copy / "done").touch()
    os.utime(shared / "old-copy/done", (day_ago, day_ago))

    first, second = worker("w1"), worker("w2")  # started together, as `dvc queue start -j 2` does
    logs = [p.communicate(timeout=600)[1] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], "\n".join(logs)
    assert sum(WAITING in log for log in logs) == 1, logs
    for name in ("best.pt", "run.json", "history.csv"):
        first, second = (tmp_path / w / "models/ae/seed0" / name for w in ("w1", "w2"))
        assert first.read_bytes() == second.read_bytes()
    mlflow.set_tracking_uri(store)  # this test's store: an earlier in-process test may have set another
    runs = mlflow.search_runs(experiment_names=["aevae"], filter_string="tags.aevae_role = 'stage'")
    assert len(runs) == 1 and runs["status"].tolist() == ["FINISHED"], logs

    # The publication removed the copy older than a day, and only that one.
    assert not (shared / "old-copy").exists()
    assert (shared / "recent-copy/done").exists(), "a copy published just now was removed"
    assert (shared / "recent-copy/best.pt").read_bytes() == b"published weights"
    published = [done for done in shared.glob("*/done") if done.parent.name != "recent-copy"]
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


@pytest.mark.slow(16)
def test_a_killed_training_workers_lock_goes_with_it_and_the_waiting_worker_trains(tmp_path, write_params, store):
    epochs = 6
    params = write_params({"epochs": epochs, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 80},
                           "train": {"threads": 1}, "tracking": {"images_every": 0, "system_metrics": False}})
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=store, DVC_ROOT=str(tmp_path))
    subprocess.run([sys.executable, str(REPO / "stages/prepare.py"), "--params", params, "--out", "prepared"],
                   cwd=tmp_path, env=env, check=True, capture_output=True)
    workers, logs = {}, {}
    for name in ("w1", "w2"):  # started together, as `dvc queue start -j 2` does
        (tmp_path / name).mkdir()
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("w") as log:
            workers[name] = subprocess.Popen(train_command(params, tmp_path / "prepared", "models"),
                                             cwd=tmp_path / name, env=env, stderr=log, text=True)
    try:
        # The one that took the lock trains: paused (holding its lock) once its first epoch is saved, ...
        deadline = time.monotonic() + 120
        while True:
            training = [n for n in workers if (tmp_path / n / "models/ae/seed0/last.pt").exists()]
            if training or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(training) == 1, {n: logs[n].read_text()[-2000:] for n in workers}
        trainer, waiter = training[0], next(n for n in workers if n != training[0])
        wait_for_epoch(tmp_path / trainer / "models/ae/seed0/last.pt", 1, workers[trainer])
        workers[trainer].send_signal(signal.SIGSTOP)
        assert workers[trainer].poll() is None, "the training ended before it could be killed"
        # ... until the other one waits for it; then killed.
        deadline = time.monotonic() + 120
        while WAITING not in logs[waiter].read_text() and time.monotonic() < deadline:
            assert workers[waiter].poll() is None, logs[waiter].read_text()[-3000:]
            time.sleep(0.05)
        assert WAITING in logs[waiter].read_text(), logs[waiter].read_text()[-3000:]
        workers[trainer].kill()
        workers[trainer].wait()
        killed = torch.load(tmp_path / trainer / "models/ae/seed0/last.pt", weights_only=True)
        assert not killed["complete"]

        try:
            workers[waiter].wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{waiter} still waits 120 s after the worker holding the lock was killed:\n"
                        f"{logs[waiter].read_text()[-3000:]}")
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = logs[waiter].read_text()
    assert workers[waiter].returncode == 0, log[-3000:]
    # It trained the model itself, from the first epoch: nothing to copy from a killed training.
    assert "outputs of the identical training" not in log and f"ae-seed0 epoch 1/{epochs}" in log, log[-3000:]
    out = tmp_path / waiter / "models/ae/seed0"
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["complete"] and [row["epoch"] for row in last["history"]] == list(range(1, epochs + 1))
    history = (out / "history.csv").read_text().splitlines()
    assert [int(row.split(",")[0]) for row in history[1:]] == list(range(1, epochs + 1))
    client = mlflow.MlflowClient(store)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert run_id != killed["run_id"] and client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, epochs + 1))
