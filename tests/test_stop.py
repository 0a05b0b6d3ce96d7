"""A stop request (SIGUSR1 ahead of a Slurm time limit; SIGTERM on preemption or requeue; Ctrl-C) saves the
training's whole state mid-epoch, and the training resumed from it ends bitwise equal to an uninterrupted
one, in the same MLflow run (aevae.train.stop; docs/reliability.md)."""

from __future__ import annotations

import torch

from aevae.config.load import load_params
from aevae.data.prepare import prepare
from aevae.files.model_dir import ModelDir
from aevae.machine.device import pick_device
from aevae.train.loop import EpochInterrupted
from aevae.train.stage import load_training_data, training_params
from aevae.train.state import note_hardware, save_resume_state, start_or_resume, train_one_epoch

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
    the training never stopped. ~5 s."""
    params = load_params(write_params(PARAMS))
    data = tmp_path / "prepared"
    prepare(params.data, seed=0, out=data)
    train_x, val_x, sha = load_training_data(data, 32)
    fingerprint = {"params": training_params("vae", 0, params), "data_sha256": sha}
    cpu = pick_device("cpu")

    def run(folder: str, stop_at: tuple[int, int] | None) -> tuple[dict, dict]:
        model_dir = ModelDir.of(tmp_path / folder, "vae", 0)
        model_dir.path.mkdir(parents=True)
        state = start_or_resume("vae", 0, params, model_dir.last, fingerprint, cpu)
        while state.epoch < EPOCHS:
            stop = _after_batch(stop_at[1]) if stop_at and state.epoch + 1 == stop_at[0] else None
            try:
                train_one_epoch(state, train_x, val_x, params, cpu, stop=stop)
            except EpochInterrupted as interrupted:
                assert interrupted.progress.batches == 3 and state.partial is interrupted.progress
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
        return saved, state.optimizer.state_dict()

    reference, reference_optimizer = run("reference", None)
    resumed, resumed_optimizer = run("stopped", (2, 3))
    assert _states_equal(reference["state_dict"], resumed["state_dict"])
    assert reference["history"] == resumed["history"]
    for p, q in zip(reference_optimizer["state"].values(), resumed_optimizer["state"].values(), strict=True):
        assert _states_equal(p, q)
    assert torch.equal(reference["generator"], resumed["generator"])
    assert torch.equal(reference["torch_rng"], resumed["torch_rng"])


def test_a_last_pt_that_is_not_resumed_says_why(tmp_path, write_params, caplog):
    """A job that starts over must say so in its log: no state, other params, a finished training."""
    params = load_params(write_params(PARAMS))
    fingerprint = {"params": training_params("vae", 0, params), "data_sha256": "x"}
    last = tmp_path / "last.pt"
    cpu = pick_device("cpu")
    caplog.set_level("INFO")
    start_or_resume("vae", 0, params, last, fingerprint, cpu)
    assert f"vae: no saved state in {last}: training from epoch 0" in caplog.text
    state = start_or_resume("vae", 0, params, last, fingerprint, cpu)
    state.history = [{"val_loss": 1.0}]
    save_resume_state(state, ModelDir(tmp_path), fingerprint, EPOCHS)
    other = load_params(write_params({**PARAMS, "lr": 0.01}, name="other.yaml"))
    caplog.clear()
    start_or_resume("vae", 0, other, last, {"params": training_params("vae", 0, other), "data_sha256": "x"}, cpu)
    assert f"vae: not resuming {last}: its params differ (lr); training from epoch 0" in caplog.text
    caplog.clear()
    start_or_resume("vae", 0, params, last, {**fingerprint, "data_sha256": "y"}, cpu)
    assert "it was trained on other data" in caplog.text
    state.epoch = EPOCHS
    save_resume_state(state, ModelDir(tmp_path), fingerprint, EPOCHS)
    caplog.clear()
    start_or_resume("vae", 0, params, last, fingerprint, cpu)
    assert "holds a finished training of these params" in caplog.text




def test_a_training_resumed_on_other_hardware_goes_on_and_says_so(tmp_path, write_params, caplog):
    """train.device/precision auto resolve per machine, and a requeued job may land on another kind of node:
    last.pt records what the training ran on, and a resume elsewhere keeps its epochs but warns."""
    params = load_params(write_params(PARAMS))
    fingerprint = {"params": training_params("vae", 0, params), "data_sha256": "x"}
    last, cpu = tmp_path / "last.pt", pick_device("cpu")
    gpu = {"device": "NVIDIA H200", "precision": "bf16"}
    state = start_or_resume("vae", 0, params, last, fingerprint, cpu)
    note_hardware(state, gpu, "vae-seed0")
    state.history, state.epoch = [{"val_loss": 1.0}], 1
    save_resume_state(state, ModelDir(tmp_path), fingerprint, EPOCHS)
    assert torch.load(last, weights_only=True)["hardware"] == gpu
    caplog.set_level("INFO")
    resumed = start_or_resume("vae", 0, params, last, fingerprint, cpu)
    note_hardware(resumed, gpu, "vae-seed0")
    assert resumed.epoch == 1 and "resuming a training that ran on" not in caplog.text
    here = {"device": "AVX2", "precision": "fp32"}
    note_hardware(resumed, here, "vae-seed0")
    assert ("vae-seed0: resuming a training that ran on NVIDIA H200 (bf16) here on AVX2 (fp32): from epoch 2 on"
            in caplog.text)
    assert resumed.hardware == here and resumed.epoch == 1
