"""Faults injected into real training processes: kills, signals, divergence, a full disk, bad paths."""

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from aevae import AevaeError
from aevae.config.load import load_params
from aevae.data.prepare import prepare
from aevae.files.model_dir import ModelDir
from aevae.train.stage import train
from tests.conftest import REPO, merged, one_line_error, project_env, train_command, wait_for_epoch
from tests.studies import built_once

pytestmark = pytest.mark.slow(10)
FAULT_PARAMS = {"epochs": 6, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 200},
                "models": {"vae": {"latent_dim": 16}}, "train": {"threads": 1}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Built once per session (tests/studies.py), read-only: FAULT_PARAMS' prepared data (prepared/) and the VAE
    trained on it by the stage with no fault (reference/vae/seed0), what every faulted training must end equal
    to; and its params (params.yaml)."""

    def build(folder: Path) -> None:
        params = folder / "params.yaml"
        params.write_text(yaml.safe_dump(merged(yaml.safe_load((REPO / "params.yaml").read_text()), FAULT_PARAMS)))
        prepare(load_params(params).data, seed=0, out=folder / "prepared")
        env = project_env(folder, MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}")
        trained = subprocess.run(train_command(params, folder / "prepared", folder / "reference", model="vae"),
                                 env=env, capture_output=True, text=True)
        assert trained.returncode == 0, trained.stderr[-3000:]

    return built_once(tmp_path_factory, "fault-reference", build)


@pytest.fixture
def fault_setup(tmp_path, write_params, store, uninterrupted):
    params_file = write_params(FAULT_PARAMS)
    data = uninterrupted / "prepared"  # the trainings only read it
    env = project_env(tmp_path, MLFLOW_TRACKING_URI=store)

    def start(models: Path, params: Path = params_file, **popen) -> subprocess.Popen:
        """The VAE's training stage writing to <models>/vae/seed0."""
        return subprocess.Popen(train_command(params, data, models, model="vae"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **popen)

    return start


def out(models: Path) -> Path:
    return models / "vae" / "seed0"


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow(30)
def test_sigkill_then_restart_resumes_to_bitwise_identical_weights(fault_setup, tmp_path, store, uninterrupted):
    """Slow (~30 s): two training processes, one killed and one resuming, against the reference trained once per
    session."""
    killed = out(tmp_path / "killed")

    proc = fault_setup(tmp_path / "killed")
    wait_for_epoch(killed / "last.pt", 1, proc)  # killed as soon as one epoch is saved, mid-way through 6
    proc.kill()
    proc.wait()
    interrupted = torch.load(killed / "last.pt", weights_only=True)
    assert 1 <= interrupted["epoch"] < 6 and not interrupted["complete"]
    (killed / "best.pt").unlink()  # as `dvc repro` does to a stage's outputs before running it

    resumed = finish(fault_setup(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {interrupted['epoch']}" in resumed.stderr
    a = torch.load(out(uninterrupted / "reference") / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["history"] == b["history"]
    folders = (uninterrupted / "reference", tmp_path / "killed")
    best_a, best_b = (torch.load(out(d) / "best.pt", weights_only=True) for d in folders)
    assert best_a["epoch"] == best_b["epoch"] and best_a["val_loss"] == best_b["val_loss"]
    assert all(torch.equal(best_a["state_dict"][k], best_b["state_dict"][k]) for k in best_a["state_dict"])

    client = mlflow.MlflowClient(store)
    run_id = json.loads((killed / "run.json").read_text())["run_id"]
    assert run_id == interrupted["run_id"]  # the same MLflow run, continued
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == set(range(1, 7))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_keeps_the_checkpoint_and_marks_the_run_killed(fault_setup, tmp_path, store, write_params, sig):
    # Far more epochs than it will get through, so only the signal can end it. The child gets the default
    # SIGINT disposition: a shell without job control starts background jobs (e.g. `bash .ci/run &`) with
    # SIGINT ignored, which children inherit and Python then honours.
    long = write_params({**FAULT_PARAMS, "epochs": 1000}, name="long.yaml")
    proc = fault_setup(tmp_path / "out", params=long,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_epoch(out(tmp_path / "out") / "last.pt", 1, proc)
    proc.send_signal(sig)
    result = finish(proc, timeout=120)
    assert result.returncode == 130
    assert "Interrupted" in result.stderr and "Traceback" not in result.stderr
    assert torch.load(out(tmp_path / "out") / "last.pt", weights_only=True)["epoch"] >= 1
    run_id = json.loads((out(tmp_path / "out") / "run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(store).get_run(run_id).info.status == "KILLED"


@pytest.mark.slow(20)
def test_sigusr1_saves_the_state_and_the_stage_resumes_it_bitwise_in_the_same_run(fault_setup, tmp_path, store,
                                                                                   uninterrupted):
    """The training stage as Slurm's time-limit notice reaches it: SIGUSR1 once its first epoch is saved. It
    stops after the batch it was in (exit 130, the message says where it saved), and the same command
    resumes there and ends bitwise equal to an uninterrupted training, in the same MLflow run. ~20 s."""
    stopped = out(tmp_path / "stopped")
    proc = fault_setup(tmp_path / "stopped")
    wait_for_epoch(stopped / "last.pt", 1, proc)
    proc.send_signal(signal.SIGUSR1)
    result = finish(proc)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    saved = torch.load(stopped / "last.pt", weights_only=True)
    assert 1 <= saved["epoch"] < FAULT_PARAMS["epochs"] and not saved["complete"]
    where = (f"in epoch {saved['epoch'] + 1} after batch {saved['partial']['batches']} of"
             if saved["partial"] else f"after epoch {saved['epoch']}")
    assert f"Interrupted: vae-seed0 stopped by SIGUSR1 {where}" in result.stderr, result.stderr
    (stopped / "best.pt").unlink()  # as `dvc repro` does to a stage's outputs before running it

    resumed = finish(fault_setup(tmp_path / "stopped"))
    assert resumed.returncode == 0, resumed.stderr
    where = (f"in epoch {saved['epoch'] + 1} after batch {saved['partial']['batches']}" if saved["partial"]
             else f"after epoch {saved['epoch']}")
    assert f"vae: resuming {where}" in resumed.stderr, resumed.stderr
    folders = (uninterrupted / "reference", tmp_path / "stopped")
    a, b = (torch.load(out(d) / "last.pt", weights_only=True) for d in folders)
    assert _equal(a["state_dict"], b["state_dict"]) and a["history"] == b["history"]
    best_a, best_b = (torch.load(out(d) / "best.pt", weights_only=True) for d in folders)
    assert _equal(best_a["state_dict"], best_b["state_dict"])

    client = mlflow.MlflowClient(store)
    run_id = json.loads((stopped / "run.json").read_text())["run_id"]
    assert run_id == saved["run_id"] and client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(1, FAULT_PARAMS["epochs"] + 1))  # each epoch logged once


def test_divergence_stops_with_a_clear_error_and_no_nan_checkpoint(tmp_path, store, write_params):
    tiny_data = tmp_path / "prepared"
    prepare(load_params(write_params({"data": {"image_size": 32, "builtin_size": 60}})).data, seed=0, out=tiny_data)
    params = load_params(write_params({"lr": 10.0, "epochs": 2, "batch_size": 16, "data": {"image_size": 32}}))
    with pytest.raises(AevaeError, match=r"diverged in epoch 1: loss is nan in batch \d+ .*last good checkpoint: none"):
        train(params, tiny_data, ModelDir.of(tmp_path / "models", "vae", 0))
    assert not out(tmp_path / "models").joinpath("best.pt").exists()
    run_id = json.loads((out(tmp_path / "models") / "run.json").read_text())["run_id"]
    assert mlflow.MlflowClient(store).get_run(run_id).info.status == "FAILED"


@pytest.mark.slow(15)
def test_divergence_after_good_epochs_names_the_epoch_the_batch_and_the_last_good_checkpoint(fault_setup, tmp_path):
    """A training killed after its first epochs resumes with an absurd learning rate (written into its
    last.pt, as a bad restart would): it diverges in the next epoch, names it, and leaves last.pt good."""
    last = out(tmp_path / "m") / "last.pt"
    proc = fault_setup(tmp_path / "m")
    wait_for_epoch(last, 1, proc)
    proc.kill()
    proc.wait()
    state = torch.load(last, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["lr"] = 1e30  # each Adam step moves every weight by about lr: the next batch overflows
    torch.save(state, last)
    good = state["epoch"]

    result = finish(fault_setup(tmp_path / "m"))
    error = one_line_error(result, f"diverged in epoch {good + 1}: loss is")
    # The resumed weights are good: the first batch's loss is finite, its step overflows, the second is not.
    assert re.search(r"loss is (nan|-?inf) in batch 2 at lr 1e\+30", error), error
    assert f"last good checkpoint: {last} (epoch {good}); lower lr and run again" in error
    kept = torch.load(last, weights_only=True)
    assert kept["epoch"] == good and all(torch.isfinite(v).all() for v in kept["state_dict"].values())


def test_a_full_disk_is_a_clear_error_and_the_previous_checkpoint_survives(fault_setup, tmp_path, write_params,
                                                                           uninterrupted):
    import resource

    shutil.copytree(uninterrupted / "reference", tmp_path / "out")  # a finished training's folder
    before = torch.load(out(tmp_path / "out") / "best.pt", weights_only=True)

    def small_disk():  # files may not grow past 1 MiB: writes fail as on a full disk (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    other = write_params({**FAULT_PARAMS, "lr": 0.001}, name="other.yaml")
    result = finish(fault_setup(tmp_path / "out", params=other, preexec_fn=small_disk))
    error = one_line_error(result, "Error: cannot write ")
    written = Path(re.search(r"cannot write (\S+): ", error).group(1))  # the file that did not fit, by name
    assert written.parent == out(tmp_path / "out") and written.name in {"best.pt", "last.pt"}, error
    after = torch.load(out(tmp_path / "out") / "best.pt", weights_only=True)
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])
    assert not list(out(tmp_path / "out").glob(".*.tmp*"))  # no half-written temporary file left behind


def test_an_output_path_that_cannot_be_a_folder_is_a_one_line_error(fault_setup, tmp_path):
    (tmp_path / "blocker").write_text("a file where the output folder should go")
    result = finish(fault_setup(tmp_path / "blocker" / "models"))
    one_line_error(result, str(tmp_path / "blocker"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
