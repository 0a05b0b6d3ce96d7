"""A last.pt of other params or other data is ignored: training starts over from epoch 1, in a new MLflow run
(docs/reliability.md; resuming the same configuration is tests/test_faults.py's)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch

from aevae.config.load import load_params
from aevae.data.prepare import prepare
from tests.conftest import project_env, train_command, wait_for_epoch

pytestmark = pytest.mark.slow(20)
EPOCHS = 6
RESUME_PARAMS = {"epochs": EPOCHS, "lr": 0.002, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 80},
                 "train": {"threads": 1}, "tracking": {"images_every": 0, "system_metrics": False}}


@pytest.mark.slow(22)
def test_a_last_pt_of_other_params_or_other_data_is_ignored_and_training_starts_over(tmp_path, write_params, store):
    """Slow (~20 s): real training processes, as a queue worker starts them."""
    params = write_params(RESUME_PARAMS)
    other_lr = write_params({**RESUME_PARAMS, "lr": 0.001}, name="other_lr.yaml")
    data, other_data = tmp_path / "prepared", tmp_path / "prepared_other"
    prepare(load_params(params).data, seed=0, out=data)
    # Another data set of the same image size: more built-in crops, another sha256.
    prepare(load_params(write_params({"data": {"image_size": 32, "builtin_size": 96}}, name="d.yaml")).data,
            seed=0, out=other_data)
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=store)

    def start(models: Path, params_file: Path, data_dir: Path) -> subprocess.Popen:
        return subprocess.Popen(train_command(params_file, data_dir, models), cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # An unfinished training of `params` on `data`: killed once its first epoch is saved.
    first = tmp_path / "models/ae/seed0"
    proc = start(tmp_path / "models", params, data)
    wait_for_epoch(first / "last.pt", 1, proc)
    proc.kill()
    proc.wait()
    killed = torch.load(first / "last.pt", weights_only=True)
    assert 1 <= killed["epoch"] < EPOCHS and not killed["complete"], "not killed mid-way: nothing to resume"
    assert killed["fingerprint"]["params"]["lr"] == 0.002
    for name in ("best.pt", "history.csv", "run.json"):  # as `dvc repro` deletes a stage's outputs
        (first / name).unlink(missing_ok=True)
    # The same file where a training of the same params on the other data starts.
    second = tmp_path / "other/ae/seed0"
    second.mkdir(parents=True)
    shutil.copy2(first / "last.pt", second / "last.pt")

    # Both at once (two cores): the killed one's folder with another lr, the copy with other data.
    procs = [start(tmp_path / "models", other_lr, data), start(tmp_path / "other", params, other_data)]
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    client = mlflow.MlflowClient(store)
    other_data_sha = json.loads((other_data / "manifest.json").read_text())["sha256"]
    killed_sha = killed["fingerprint"]["data_sha256"]
    for out, log, lr, sha, why in ((first, logs[0], 0.001, killed_sha, "its params differ (lr)"),
                                   (second, logs[1], 0.002, other_data_sha, "it was trained on other data")):
        # It starts over and says why (a requeued Slurm job's log must).
        assert f"ae: not resuming {out / 'last.pt'}: {why}; training from epoch 0" in log, log[-3000:]
        assert "resuming after" not in log and f"ae-seed0 epoch 1/{EPOCHS}" in log, log[-3000:]
        with (out / "history.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1)), out
        assert float(rows[0]["lr"]) == lr, out  # the first epoch of this training's own optimizer
        last = torch.load(out / "last.pt", weights_only=True)
        assert last["epoch"] == EPOCHS and last["complete"]
        assert last["fingerprint"]["params"]["lr"] == lr and last["fingerprint"]["data_sha256"] == sha
        assert [row["epoch"] for row in last["history"]] == list(range(1, EPOCHS + 1))
        run_id = json.loads((out / "run.json").read_text())["run_id"]
        assert run_id == last["run_id"] != killed["run_id"], "logged into the killed training's MLflow run"
        assert client.get_run(run_id).info.status == "FINISHED"
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(1, EPOCHS + 1))
    # The killed training's run got nothing after its kill (its last epoch's point may be there twice: MLflow
    # gets it before last.pt is replaced).
    steps = {m.step for m in client.get_metric_history(killed["run_id"], "val_loss")}
    assert steps <= set(range(1, killed["epoch"] + 2)), steps
