"""The study as one pipeline, as a user grows it: a new model kind added as docs/models.md says (one class and
its params entry, nothing else), then more training seeds, each trained once."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tests.conftest import TINY, commit_study, copy_project, merged, project_env, run
from tests.studies import built_once, copy_of

# One study built for the module (and a copy of it with a second seed): its tests run on one worker.
pytestmark = [pytest.mark.slow(30), pytest.mark.xdist_group("new-kind-study")]

# docs/models.md, "Adding a model kind": a class in a module of aevae/models and an entry under models:.
NEW_KIND = '''

class WideVAE(VAE):
    """A VAE under its own name: the recipe's example of a new kind."""

    kind = "wide_vae"
'''
STUDY = merged(TINY, {"models": {"wide": {"kind": "wide_vae", "latent_dim": 16, "beta": 0.5, "kl_warmup_epochs": 0},
                                 "sigma": {"kind": "sigma_vae", "latent_dim": 16}}})
# The smallest study that shows the new kind beside the others: a model without a prior and one with an ELBO
# besides it (the AE at the VAE's code size adds nothing here but trainings); and the sigma-VAE, a shipped kind
# that is one entry under models: too.
CONFIGS = ("ae", "vae", "wide", "sigma")
# The `aevae` command of the study's own code (the installed one has no WideVAE): python -c puts the working
# directory first on sys.path, as an editable install of that repository would.
AEVAE = [sys.executable, "-c", "from aevae.commands.main import main; main()"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return project_env(tmp_path_factory.mktemp("env"))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A copy of the project with a new kind added by the recipe, after one `dvc repro` (seed 0); built once
    per session (tests/studies.py), read-only: a test that runs a command in it takes a copy."""

    def build(folder: Path) -> None:
        repo = copy_project(folder / "repo", STUDY)
        with open(repo / "aevae/models/vae.py", "a", encoding="utf-8") as f:
            f.write(NEW_KIND)
        commit_study(repo, project_env(folder), STUDY, CONFIGS, copied=True)

    return built_once(tmp_path_factory, "new-kind-study", build) / "repo"


def training_runs(repo: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    frame = mlflow.search_runs(experiment_names=["aevae"])
    return frame[frame["tags.model_config"].notna()].reset_index(drop=True)


@pytest.mark.slow(70)
def test_a_new_kind_goes_through_every_stage_and_command(study, env, tmp_path):
    """Every stage ran the new kind (the shared study's outputs), and every command takes it (in a copy)."""
    result = json.loads((study / "metrics/eval.json").read_text())
    assert [k for k in result if k in CONFIGS] == list(CONFIGS)
    assert result["wide"]["seeds"] == [0] and result["wide"]["kl_nats"] > 0  # its ELBO, asked of the contract
    report = (study / "reports/report.md").read_text()
    assert "VAE beta=0.5" in report and "## Rate and distortion" in report  # two models with an ELBO
    assert (study / "reports/rate_distortion.png").stat().st_size > 10_000
    assert "## Sampling (VAE, VAE beta=0.5, sigma-VAE)" in report  # samples and interpolation: every generative model
    runs = training_runs(study)
    wide = runs[runs["tags.model_config"] == "wide"].iloc[0]
    assert wide["tags.model_kind"] == "wide_vae" and wide["params.model.kind"] == "wide_vae"
    assert wide["status"] == "FINISHED" and wide["metrics.test_psnr"] == pytest.approx(result["wide"]["psnr"], abs=1e-5)

    study = copy_of(study, tmp_path / "study")  # the commands below run in it
    run([*AEVAE, "compare", "--csv", str(tmp_path / "all.csv")], study, env)
    table = pd.read_csv(tmp_path / "all.csv")
    assert set(table["model"]) == set(CONFIGS)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{i}.png")
    out = run([*AEVAE, "reconstruct", "models/wide/seed0/best.pt", str(photos), "--out", str(tmp_path / "r")],
              study, env).stdout
    assert "2 image(s)" in out and (tmp_path / "r/scores.csv").is_file()
    run([*AEVAE, "reconstruct", f"runs:/{wide['run_id']}/model", str(photos), "--out", str(tmp_path / "u")],
        study, env)
    assert (tmp_path / "u/scores.csv").read_text() == (tmp_path / "r/scores.csv").read_text()
    run([*AEVAE, "sample", "models/wide/seed0/best.pt", "-n", "4", "--out", str(tmp_path / "s.png"), "--between",
         str(photos / "0.png"), str(photos / "1.png")], study, env)
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s-interpolation.png").is_file()


def test_the_sigma_vae_is_one_entry_under_models_and_scored_as_a_density_model(study):
    """The calibrated-decoder VAE beside the VAE by one params entry: trained with its learned sd (logged each
    epoch), scored in bits/dim like every model with an ELBO, under the sd its training implied too."""
    result = json.loads((study / "metrics/eval.json").read_text())
    sigma, vae, wide = result["sigma"], result["vae"], result["wide"]
    history = pd.read_csv(study / "models/sigma/seed0/history.csv")
    learned = history["val_sigma"].iloc[-1]
    assert learned == pytest.approx(sigma["trained_sigma"], rel=0.05) and learned < 0.99  # it moved from sd 1
    assert wide["trained_sigma"] == pytest.approx(0.5) and vae["trained_sigma"] == pytest.approx(0.5 ** 0.5)
    for entry in (sigma, vae, wide):
        assert 0 < entry["bpd"] < entry["bpd_elbo"] and 0 < entry["sigma"] < 1
    assert vae["sigma"] < vae["trained_sigma"] and wide["sigma"] < wide["trained_sigma"]  # beta's sd: far too wide
    latents = pd.read_csv(study / "metrics/latents.csv")
    assert list(dict.fromkeys(latents["model"])) == ["vae", "wide", "sigma"]
    likelihood = (study / "reports/report.md").read_text().split("## Likelihood", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"\| sigma-VAE +\| {sigma['bpd']:.3f} \[", likelihood)
    assert f"({sigma['trained_sigma']:.4f} on [0, 1]" in likelihood
    runs = training_runs(study)
    logged = runs[runs["tags.model_config"] == "sigma"].iloc[0]
    assert logged["metrics.test_bpd"] == pytest.approx(sigma["bpd"], abs=1e-5) and logged["metrics.val_sigma"] > 0


@pytest.fixture(scope="module")
def two_seeds(study, env, tmp_path_factory) -> tuple[Path, str, pd.DataFrame]:
    """`dvc exp run -S 'train.seeds=[0,1]' -S epochs=1` in the workspace of a copy of the study, seed 0
    trained before: the copy, the command's output, and the MLflow training runs it added. Shared by the two
    tests that read it."""
    repo = copy_of(study, tmp_path_factory.mktemp("two-seeds") / "repo")
    before = training_runs(repo)
    out = run(["dvc", "exp", "run", "-S", "train.seeds=[0,1]", "-S", "epochs=1"], repo, env).stdout
    after = training_runs(repo)
    return repo, out, after[~after["run_id"].isin(before["run_id"])]


@pytest.mark.slow(60)
def test_a_second_seed_is_one_command_and_the_report_covers_both(two_seeds):
    """Slow (~60 s): the group's fixture trains a second seed of three models and evaluates and reports."""
    study, out, _ = two_seeds
    for config in CONFIGS:
        assert f"Running stage 'train@{config}-1'" in out and f"Running stage 'train@{config}-0'" not in out
    result = json.loads((study / "metrics/eval.json").read_text())
    per_image = pd.read_csv(study / "metrics/per_image.csv")
    for config in CONFIGS:
        assert result[config]["seeds"] == [0, 1]
        rows = per_image[per_image["model"] == config]
        assert sorted(rows["seed"].unique()) == [0, 1]
        for metric in ("psnr", "ssim", "lpips", "mse"):  # the mean over seeds of each seed's image mean
            assert result[config][metric] == pytest.approx(rows.groupby("seed")[metric].mean().mean(), abs=1e-5)
    report = (study / "reports/report.md").read_text()
    assert "2 training seeds (0, 1)" in report and "Interval method: two-way percentile bootstrap" in report
    assert re.search(r"± [0-9.]+ \[", report)  # the seed-to-seed sd beside every mean


@pytest.mark.slow(1)
def test_adding_a_seed_trains_only_that_seed_once_per_model(two_seeds):
    """What the second seed's command added: one training run per model, of the new seed only."""
    study, _, new = two_seeds
    assert sorted(new["tags.model_config"]) == sorted(CONFIGS)  # one new training run per model
    assert set(new["params.train.seed"]) == {"1"}
    assert yaml.safe_load((study / "params.yaml").read_text())["train"]["seeds"] == [0, 1]
    assert json.loads((study / "metrics/eval.json").read_text())["vae"]["seeds"] == [0, 1]
