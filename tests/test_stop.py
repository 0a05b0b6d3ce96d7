"""A stop request (SIGUSR1 ahead of a Slurm time limit; SIGTERM on preemption or requeue; Ctrl-C) saves the
training's whole state mid-epoch, and the training resumed from it ends bitwise equal to an uninterrupted
one, in the same MLflow run (aevae.train.stop; docs/reliability.md)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from aevae.config.load import load_params
from aevae.data.prepare import prepare
from aevae.files.model_dir import ModelDir
from aevae.machine.device import pick_device
from aevae.train.loop import EpochInterrupted
from aevae.train.stage import load_training_data, train, training_params
from aevae.train.state import save_resume_state, start_or_resume, train_one_epoch
from aevae.train.stop import SIGNALS, Stopped
from tests.conftest import this_machine

EPOCHS = 3
PARAMS = {"epochs": EPOCHS, "batch_size": 8, "data": {"image_size": 32, "builtin_size": 80},
          "models": {"vae": {"latent_dim": 16}}, "train": {"threads": 1}}


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _after_batch(batch: int):
    """A stop request that comes in during batch `batch` (asked once after each batch)."""
    asked = iter(range(1, 1_000_000))
    return lambda: next(asked) == batch


def test_a_training_stopped_after_any_batch_resumes_bitwise(tmp_path, write_params):
    """In-process, deterministic: the VAE (its loss draws noise from torch's RNG) stopped after batch 3 of
    epoch 2, its last.pt reloaded into a fresh state, ends with the weights, optimizer state and history of
    the training never stopped. Guards `train_one_epoch(stop=...)`: the stop must fire (once, after batch 3),
    and the resume must be exact. ~5 s."""
    params = load_params(write_params(PARAMS))
    data = tmp_path / "prepared"
    prepare(params.data, seed=0, out=data)
    train_x, val_x, sha = load_training_data(data, 32)
    fingerprint = {"params": training_params("vae", 0, params), "data_sha256": sha}
    cpu = pick_device("cpu")

    def run(folder: str, stop_at: tuple[int, int] | None) -> tuple[dict, dict, list[tuple[int, int]]]:
        """The training, stopped as `stop_at` says; also where it stopped: (epoch, batches done) per stop."""
        model_dir = ModelDir.of(tmp_path / folder, "vae", 0)
        model_dir.path.mkdir(parents=True)
        state = start_or_resume("vae", 0, params, model_dir.last, fingerprint, cpu)
        stops = []
        while state.epoch < EPOCHS:
            stop = _after_batch(stop_at[1]) if stop_at and state.epoch + 1 == stop_at[0] else None
            try:
                train_one_epoch(state, train_x, val_x, params, cpu, stop=stop)
            except EpochInterrupted as interrupted:
                stops.append((state.epoch + 1, interrupted.progress.batches))
                assert state.partial is interrupted.progress
                save_resume_state(state, model_dir, fingerprint, EPOCHS)
                saved = torch.load(model_dir.last, weights_only=True)
                assert saved["partial"]["batches"] == 3 and saved["epoch"] == 1 and not saved["complete"]
                state = start_or_resume("vae", 0, params, model_dir.last, fingerprint, cpu)  # a new process
                assert state.epoch == 1 and state.partial.batches == 3
                stop_at = None
                continue
            save_resume_state(state, model_dir, fingerprint, EPOCHS)
        saved = torch.load(model_dir.last, weights_only=True)
        assert saved["complete"] and saved["partial"] is None
        return saved, state.optimizer.state_dict(), stops

    reference, reference_optimizer, never = run("reference", None)
    resumed, resumed_optimizer, stops = run("stopped", (2, 3))
    assert never == [] and stops == [(2, 3)]  # the stop fired, once, in epoch 2 after its batch 3
    assert _states_equal(reference["state_dict"], resumed["state_dict"])
    assert reference["history"] == resumed["history"]
    for p, q in zip(reference_optimizer["state"].values(), resumed_optimizer["state"].values(), strict=True):
        assert _states_equal(p, q)
    assert torch.equal(reference["generator"], resumed["generator"])
    assert torch.equal(reference["torch_rng"], resumed["torch_rng"])


def test_a_last_pt_that_is_not_resumed_says_why(tmp_path, write_params, caplog):
    """A job that starts over must do so, and say why in its log: no state, other params, other data, a
    finished training. Each refusal gives a fresh seeded state (epoch 0, no history, no MLflow run, the
    initial weights), where the same last.pt with a matching fingerprint resumes (epoch 1, its weights)."""
    params = load_params(write_params(PARAMS))
    fingerprint = {"params": training_params("vae", 0, params), "data_sha256": "x"}
    last = tmp_path / "last.pt"
    cpu = pick_device("cpu")
    caplog.set_level("INFO")
    fresh = start_or_resume("vae", 0, params, last, fingerprint, cpu)
    assert f"vae: no saved state in {last}: training from epoch 0" in caplog.text
    initial = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    state = start_or_resume("vae", 0, params, last, fingerprint, cpu)
    with torch.no_grad():  # weights no fresh state has: a resume would bring them back
        for weight in state.model.parameters():
            weight.add_(1.0)
    state.history, state.epoch, state.run_id = [{"val_loss": 1.0}], 1, "run-of-epoch-1"
    save_resume_state(state, ModelDir(tmp_path), fingerprint, EPOCHS)

    def started_over(resumed) -> bool:
        return (resumed.epoch == 0 and resumed.history == [] and resumed.run_id is None
                and _states_equal(resumed.model.state_dict(), initial))

    resumed = start_or_resume("vae", 0, params, last, fingerprint, cpu)
    assert resumed.epoch == 1 and resumed.run_id == "run-of-epoch-1" and not started_over(resumed)
    other = load_params(write_params({**PARAMS, "lr": 0.01}, name="other.yaml"))
    caplog.clear()
    refused = start_or_resume("vae", 0, other, last, {"params": training_params("vae", 0, other),
                                                      "data_sha256": "x"}, cpu)
    assert f"vae: not resuming {last}: its params differ (lr); training from epoch 0" in caplog.text
    assert started_over(refused)
    caplog.clear()
    assert started_over(start_or_resume("vae", 0, params, last, {**fingerprint, "data_sha256": "y"}, cpu))
    assert "it was trained on other data" in caplog.text
    state.epoch = EPOCHS
    save_resume_state(state, ModelDir(tmp_path), fingerprint, EPOCHS)
    caplog.clear()
    assert started_over(start_or_resume("vae", 0, params, last, fingerprint, cpu))
    assert "holds a finished training of these params" in caplog.text


def test_a_training_resumed_on_other_hardware_goes_on_and_says_so(tmp_path, write_params, store, caplog):
    """train.device/precision auto resolve per machine, and a requeued job may land on another kind of node.
    Guards what the training stage records: its last.pt names the device and precision it resolved (worked
    out here without aevae: conftest.this_machine), and a resume on other hardware keeps its epochs but warns.
    The first run is stopped by SIGUSR1 once it has saved an epoch; its last.pt then says it ran on a GPU, as
    a requeue from a GPU node would leave it."""
    params = load_params(write_params({**PARAMS, "epochs": 20, "tracking": {"images_every": 0,
                                                                            "system_metrics": False}}))
    data, out = tmp_path / "prepared", ModelDir.of(tmp_path / "models", "vae", 0)
    prepare(params.data, seed=0, out=data)
    here = this_machine()

    def notice() -> None:  # Slurm's notice, once the first epoch is saved
        deadline = time.monotonic() + 120
        while not out.last.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}  # a stopped training leaves them ignored
    try:
        threading.Thread(target=notice, daemon=True).start()
        with pytest.raises(Stopped):
            train(params, data, out)
        saved = torch.load(out.last, weights_only=True)
        assert saved["hardware"] == here and not saved["complete"] and saved["epoch"] < 20
        saved["hardware"] = {"device": "NVIDIA H200", "precision": "bf16"}
        torch.save(saved, out.last)
        caplog.set_level("INFO")
        history = train(params, data, out)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert (f"vae-seed0: resuming a training that ran on NVIDIA H200 (bf16) here on {here['device']} "
            f"({here['precision']}): from epoch {saved['epoch'] + 1} on") in caplog.text
    assert [row["epoch"] for row in history] == list(range(1, 21))  # its epochs kept, none trained twice
    assert torch.load(out.last, weights_only=True)["hardware"] == here
