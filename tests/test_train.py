import json
import math
import os
import subprocess

import mlflow
import pandas as pd
import pytest
import torch

from aevae.config.load import load_params
from aevae.data.params import DataParams
from aevae.data.prepare import prepare
from aevae.files.model_dir import ModelDir
from aevae.models.checkpoints import load_model
from aevae.models.vae import VAE
from aevae.tracking.provenance import run_tags
from aevae.train.loop import make_optimizer
from aevae.train.stage import train, training_params
from tests.conftest import REPO, this_machine


@pytest.fixture
def tiny_data(tmp_path):
    out = tmp_path / "prepared"
    prepare(DataParams(image_size=32, builtin_size=60), seed=0, out=out)
    return out


def test_kl_warmup_is_linear_then_constant(write_params):
    from aevae.models.registry import build_model

    vae = build_model("vae", load_params(write_params({"models": {"vae": {"beta": 2.0, "kl_warmup_epochs": 4}}})))
    assert [vae.kl_weight(e) for e in (1, 2, 4, 9)] == [0.5, 1.0, 2.0, 2.0]
    assert vae.kl_weight(None) == 2.0  # validation weighs KL by the final beta
    assert build_model("vae", load_params(write_params({}))).kl_weight(1) == 1.0


def test_a_training_logs_its_own_configuration_and_seed_not_the_studys(write_params):
    params = load_params(write_params({"train": {"seeds": [0, 3]}, "models": {"vae": {"beta": 0.5}}}))
    logged = training_params("vae", 3, params)
    assert logged["train.seed"] == 3 and logged["model.kind"] == "vae" and logged["model.beta"] == 0.5
    assert "train.seeds" not in logged and not any(k.startswith(("models.", "eval.", "report.")) for k in logged)
    ae = training_params("ae", 3, params)
    assert ae["model.kind"] == "ae" and "model.beta" not in ae


def test_vae_heads_learn_at_a_fan_in_scaled_rate():
    groups = make_optimizer(VAE(64, 8), lr=0.002, weight_decay=1e-5).param_groups
    assert [g["lr"] for g in groups] == [0.002, 0.002 / 16]


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_training_writes_checkpoints_history_and_an_mlflow_run(kind, tiny_data, store, tmp_path, write_params,
                                                               monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # were they on, they would be sampled
    params = load_params(write_params({"epochs": 2, "batch_size": 16, "data": {"image_size": 32},
                                       "tracking": {"system_metrics": False}}))
    out = tmp_path / kind / "seed0"
    history = train(params, tiny_data, ModelDir(out))

    assert len(history) == 2
    frame = pd.read_csv(out / "history.csv")
    expected = {"epoch", "lr", "train_loss", "val_loss", "val_mse"}
    if kind == "vae":
        expected |= {"train_recon", "train_kl", "val_recon", "val_kl", "val_active_units", "kl_weight"}
    assert expected <= set(frame.columns)
    assert frame["val_loss"].notna().all()
    if kind == "vae":  # the loss is exactly its two logged terms
        assert frame["val_loss"].to_numpy() == pytest.approx((frame["val_recon"] + frame["val_kl"]).to_numpy())
    model, meta = load_model(out / "best.pt", image_size=32)
    assert meta["val_loss"] == pytest.approx(frame["val_loss"].min())
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "generator", "torch_rng", "run_id", "epoch"} <= set(last)

    run_id = json.loads((out / "run.json").read_text())["run_id"]
    run = mlflow.MlflowClient(store).get_run(run_id)
    assert run.info.run_name == f"{kind}-seed0" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.002" and run.data.params["epochs"] == "2"
    assert run.data.params["train.seed"] == "0" and run.data.tags["model_config"] == kind
    assert ("model.beta" in run.data.params) == (kind == "vae")
    assert len(run.data.tags["data_sha256"]) == 64
    steps = mlflow.MlflowClient(store).get_metric_history(run_id, "val_loss")
    assert [m.step for m in steps] == [1, 2]
    artifacts = {a.path for a in mlflow.MlflowClient(store).list_artifacts(run_id)}
    assert {"checkpoints", "history.csv"} <= artifacts
    assert not [m for m in run.data.metrics if m.startswith("system/")]  # tracking.system_metrics: false
    # What train.precision: auto chose on this machine, and where it ran, are tags of the run (what they must
    # be is worked out without aevae: conftest.this_machine, and git itself).
    machine = this_machine()
    assert run.data.tags["precision"] == machine["precision"] and run.data.tags["device"] == machine["device"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == head and len(head) == 40  # the tests run in the project's git clone


def test_bf16_autocast_trains_end_to_end_and_says_so(tiny_data, store, tmp_path, write_params):
    """train.precision: bf16 on any CPU (natively with AVX512-BF16 or AMX, emulated and slow elsewhere): a
    few batches train to finite losses that differ from fp32's, and the run's tag says bf16."""
    histories, tags = {}, {}
    for precision in ("fp32", "bf16"):
        params = load_params(write_params({"epochs": 1, "batch_size": 16, "data": {"image_size": 32},
                                           "train": {"threads": 1, "precision": precision},
                                           "tracking": {"images_every": 0, "system_metrics": False}}))
        out = ModelDir.of(tmp_path / precision, "vae", 0)
        histories[precision] = train(params, tiny_data, out)
        run_id = json.loads(out.run_file.read_text())["run_id"]
        tags[precision] = mlflow.MlflowClient(store).get_run(run_id).data.tags
    assert all(math.isfinite(v) for h in histories.values() for row in h for v in row.values())
    assert histories["bf16"][0]["val_loss"] != histories["fp32"][0]["val_loss"]  # bf16 rounding took part
    assert histories["bf16"][0]["val_loss"] == pytest.approx(histories["fp32"][0]["val_loss"], rel=0.05)
    assert (tags["fp32"]["precision"], tags["bf16"]["precision"]) == ("fp32", "bf16")


def test_the_git_commit_tag_is_the_commit_trained_from_or_unknown_outside_git(tmp_path, monkeypatch):
    clone = tmp_path / "clone"
    clone.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "PATH": os.environ["PATH"]}
    for command in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "one"]):
        subprocess.run(["git", *command], cwd=clone, env=env, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(clone)
    assert run_tags("0" * 64, {})["git_commit"] == head and len(head) == 40
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no git repository above it either
    assert run_tags("0" * 64, {})["git_commit"] == "unknown"


def test_training_is_reproducible(tiny_data, store, tmp_path, write_params):
    # One thread each: with threads 0 a training takes its share of the cores, which other trainings running on
    # the machine at that moment change, and a different thread count may add floats in another order.
    params = load_params(write_params({"epochs": 1, "batch_size": 16, "data": {"image_size": 32},
                                       "train": {"threads": 1}}))
    a = train(params, tiny_data, ModelDir.of(tmp_path / "a", "vae", 0))
    b = train(params, tiny_data, ModelDir.of(tmp_path / "b", "vae", 0))
    assert a == b
    c = train(params, tiny_data, ModelDir.of(tmp_path / "a", "vae", 1))  # another seed: another training
    assert c != a
