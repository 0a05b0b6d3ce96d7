"""aevae.compare's table functions, on what model_runs() (the reader of `aevae compare` and `aevae
rate-distortion`) reads from real sqlite MLflow stores: training runs logged as the train stage logs them
(aevae.tracking.runs.training_run under its pipeline's parent run, pipeline_stage), scored as evaluation
scores them (test_* metrics into the resumed run: resume_run and training_scores). One row per training run,
params as logged (strings, missing where a run did not log them), metrics as floats."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from aevae import AevaeError
from aevae.compare.rate_distortion import rate_distortion
from aevae.compare.runs import distinct_trainings, filter_params, model_runs, run_table, seed_groups
from aevae.config.schema import Params
from aevae.evaluate.mlflow_log import training_scores
from aevae.models.registry import build_model
from aevae.report.rate_distortion import plot_rate_distortion, rate_steps
from aevae.results.names import TRAINING_PARAMS
from aevae.tracking.provenance import Pipeline
from aevae.tracking.runs import pipeline_stage, resume_run, training_run
from aevae.tracking.store import open_store
from aevae.train.stage import training_params

# The module's stores are logged once (a module fixture): its tests run on one worker.
pytestmark = pytest.mark.xdist_group("sweeps-stores")

# What the runs here log, by the names the real code gives them: a training, of its training_params (every
# shared param, train.seed and model.<key>), these keys and model.<key>; its pipeline's parent run, of every
# param, these and models.<name>.<key>. No run logs epochs, say: a param no run logged is no column at all.
TRAINING_KEYS = ("lr", "train.seed", "train.device", "train.threads")
PIPELINE_KEYS = ("lr", "train.seeds", "train.device", "train.threads")


@dataclass(frozen=True)
class Training:
    """One training run as its train stage logs it, and the per-seed row its evaluation turns into test_*
    metrics (None: never evaluated)."""

    name: str  # the test's name for it
    pipeline: str
    study: Params
    config: str
    seed: int
    scores: dict | None


def training(name: str, model: str, seed: int, psnr: float, *, lr: float = 0.001, beta: float | None = None,
             kl: float | None = None, device: str = "cpu", threads: int = 2, half_width: float = 0.5,
             mse: float | None = None, pipeline: str = "exp-1", evaluated: bool = True) -> Training:
    """Configuration `model` trained with `seed`: a VAE (latent_dim 128) when `beta` is given, else an AE
    (which logs no model.beta or model.latent_dim); evaluated with these test scores unless not `evaluated`."""
    entry = {"kind": "vae", "latent_dim": 128, "beta": beta} if beta is not None else {"kind": "ae"}
    study = Params.model_validate({"lr": lr, "models": {model: entry}, "data": {"image_size": 8},
                                   "train": {"seeds": [seed], "device": device, "threads": threads}})
    mse = 10 ** (-psnr / 10) if mse is None else mse
    values = {"psnr": psnr, "ssim": psnr / 40, "lpips": 1 - psnr / 40, "mse": mse}
    scores = {"model": model, "seed": seed}
    for metric, value in values.items():  # each run's 95% interval over test images: half_width in PSNR's dB
        scores.update({metric: value, f"{metric}_ci_low": value - half_width * value / psnr,
                       f"{metric}_ci_high": value + half_width * value / psnr})
    scores["kl_nats"] = kl  # an AE's None: training_scores logs no test_kl_nats
    return Training(name, pipeline, study, model, seed, scores if evaluated else None)


def log_trainings(trainings: list[Training], folder: Path) -> dict[str, str]:
    """Log `trainings` in order into the store at MLFLOW_TRACKING_URI, each pipeline's under its parent run;
    each training's run id by its name."""
    ids = {}
    for pipeline, group in groupby(trainings, key=lambda t: t.pipeline):
        group = list(group)
        first = group[0].study.flat()
        shared = {k: v for k, v in first.items() if k in PIPELINE_KEYS or k.startswith("models.")}
        with pipeline_stage(Pipeline(shared, {"pipeline": pipeline})) as parent:
            for t in group:
                model = build_model(t.config, t.study)
                params = {k: v for k, v in training_params(t.config, t.seed, t.study).items()
                          if k in TRAINING_KEYS or k.startswith("model.")}
                tags = {"pipeline": pipeline, "model_config": t.config, "model_kind": model.kind,
                        "model_label": model.label, "precision": "fp32"}
                with training_run(f"{t.config}-seed{t.seed}", params, tags, run_id=None,
                                  run_file=folder / f"{t.name}.json", parent_id=parent,
                                  system_metrics=False) as run_id:
                    ids[t.name] = run_id
        for t in group:  # evaluation: the test scores into each training's run, as aevae.evaluate logs them
            if t.scores is not None:
                with resume_run(folder / f"{t.name}.json"):
                    mlflow.log_metrics(training_scores(pd.Series(t.scores)))
    return ids


# A beta sweep: the VAE at three betas, two seeds each, and the AE at the same settings (two seeds).
SWEEP = [  # (beta, seed, kl_nats, psnr, mse)
    (0.1, 0, 120.0, 26.0, 0.0025), (0.1, 1, 118.0, 26.4, 0.0023),
    (1.0, 0, 60.0, 24.0, 0.0040), (1.0, 1, 64.0, 23.6, 0.0044),
    (4.0, 0, 20.0, 21.0, 0.0080), (4.0, 1, 22.0, 21.5, 0.0075),
]
SWEEP_TRAININGS = [
    *(training(f"v{beta}s{seed}", "vae", seed, psnr, beta=beta, kl=kl, mse=mse) for beta, seed, kl, psnr, mse in SWEEP),
    training("a0", "ae", 0, 28.0, mse=0.0016), training("a1", "ae", 1, 27.0, mse=0.0020),
    training("a2-other-lr", "ae", 0, 15.0, lr=0.1, pipeline="exp-2"),  # not at the VAEs' settings: no reference
]
# The sweep, and a VAE trained at another lr in another experiment.
MIXED = [training("v-lr", "vae", 0, 25.0, lr=0.01, beta=1.0, kl=70.0, pipeline="exp-3")]
RETRAINED = [
    training("first", "ae", 0, 20.0),
    training("other-seed", "ae", 1, 21.0),
    training("again", "ae", 0, 22.0, pipeline="exp-2"),  # the same training, another experiment: replaces "first"
    training("elsewhere", "ae", 1, 23.0, device="cuda", threads=16, pipeline="exp-3"),  # the same as "other-seed"
    training("other-lr", "ae", 0, 24.0, lr=0.01, pipeline="exp-4"),
    training("vae", "vae", 0, 25.0, beta=1.0, kl=50.0),
    training("unscored", "ae", 2, 20.0, evaluated=False),  # trained, never evaluated: not a training to compare
]
PSNR, HALF_WIDTHS = [20.1, 20.5, 19.6], [0.3, 0.5, 0.4]
SEEDS = [
    *(training(f"a{seed}", "ae", seed, p, half_width=h, device=("cpu", "cuda", "auto")[seed])
      for seed, (p, h) in enumerate(zip(PSNR, HALF_WIDTHS))),
    training("b0", "vae", 0, 24.0, beta=0.5, kl=80.0), training("b1", "vae", 1, 23.0, beta=0.5, kl=82.0),
    training("c0", "vae", 0, 22.0, beta=2.0, kl=30.0),
]


@dataclass(frozen=True)
class Store:
    uri: str
    ids: dict[str, str]  # each training's name in the test -> its MLflow run id


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Iterator[dict[str, Store]]:
    """One sqlite MLflow store per case, logged once for the module: a new store's schema takes seconds, so
    it is made once (open_store: the schema and the aevae experiment) and each case's store starts as a copy
    of it, or of the store it adds runs to."""
    folder = tmp_path_factory.mktemp("stores")
    built: dict[str, Store] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_ROOT", str(folder))  # runs' outboxes there, not in this checkout

        def store(name: str, trainings: list[Training], base: str | None = None) -> None:
            db = folder / f"{name}.db"
            shutil.copyfile(folder / f"{base or 'empty'}.db", db)
            mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
            (folder / name).mkdir()
            ids = log_trainings(trainings, folder / name)
            built[name] = Store(f"sqlite:///{db}", {**(built[base].ids if base else {}), **ids})

        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'empty.db'}")
        open_store()
        store("sweep", SWEEP_TRAININGS)
        store("mixed", MIXED, base="sweep")
        store("retrained", RETRAINED)
        store("seeds", SEEDS)
        store("unscored", [training("a", "ae", 0, 20.0, evaluated=False)])
    yield built
    with pytest.MonkeyPatch.context() as mp:  # mlflow's own tracking URI back to none (it unsets the variable)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mlflow.set_tracking_uri(None)


@pytest.fixture
def read(stores, monkeypatch):
    """The runs of one case's store as `aevae compare` reads them: model_runs() at MLFLOW_TRACKING_URI."""

    def read(name: str) -> pd.DataFrame:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", stores[name].uri)
        return model_runs()

    return read


@pytest.fixture
def sweep(read) -> pd.DataFrame:
    return read("sweep")


def test_the_stores_hold_what_was_logged_and_model_runs_reads_only_the_trainings(stores, read):
    for name, trainings in (("sweep", SWEEP_TRAININGS), ("retrained", RETRAINED), ("seeds", SEEDS)):
        runs = read(name)
        assert list(runs["run_id"]) == [stores[name].ids[t.name] for t in trainings]  # oldest first; no parent run
        assert set(runs["status"]) == {"FINISHED"}
    client = mlflow.MlflowClient(stores["retrained"].uri)
    parents = client.search_runs([client.get_experiment_by_name("aevae").experiment_id],
                                 filter_string="tags.aevae_role = 'pipeline'")
    # exp-1 (its stages before and after the others), exp-2, -3 and -4, each with its pipeline's params
    assert sorted(r.data.tags["pipeline"] for r in parents) == ["exp-1", "exp-2", "exp-3", "exp-4"]
    assert all("train.seeds" in r.data.params for r in parents)


def test_a_configuration_trained_again_counts_once_its_latest_run(read, stores):
    runs, ids = read("retrained"), stores["retrained"].ids
    assert runs["metrics.test_psnr"].isna().tolist() == [False] * 6 + [True]  # "unscored" logged no test metric
    distinct = distinct_trainings(runs)
    assert list(distinct["run_id"]) == [ids[n] for n in ("again", "elsewhere", "other-lr", "vae")]
    assert list(distinct["metrics.test_psnr"]) == [22.0, 23.0, 24.0, 25.0]


def test_filter_params_keeps_rows_whose_params_equal_the_values(sweep, stores):
    ids = stores["sweep"].ids
    assert list(filter_params(sweep, {"lr": "0.1"})["run_id"]) == [ids["a2-other-lr"]]
    kept = filter_params(sweep, {"model.beta": "1.0", "train.seed": 1})  # compared as logged: strings
    assert list(kept["run_id"]) == [ids["v1.0s1"]]
    assert filter_params(sweep, {"model.beta": "1"}).empty  # not as logged
    assert len(filter_params(sweep, {})) == len(sweep)


def test_filter_params_names_an_unknown_key(sweep):
    with pytest.raises(AevaeError, match=r"--param optimizer=adam: no run logged a param 'optimizer'"):
        filter_params(sweep, {"lr": "0.001", "optimizer": "adam"})


def test_seed_groups_mean_and_sd_over_seeds_and_the_mean_interval(read):
    groups = seed_groups(read("seeds")).set_index("model")
    assert list(groups.index) == ["AE", "VAE beta=0.5", "VAE beta=2"]
    assert list(groups["model.beta"]) == ["", "0.5", "2.0"]  # what varies between trainings of a model
    assert "lr" not in groups and "train.device" not in groups  # the same everywhere / where it ran
    assert list(groups["seeds"]) == [3, 2, 1]
    ae = groups.loc["AE"]
    assert ae["psnr mean"] == pytest.approx(np.mean(PSNR))
    assert ae["psnr sd (seeds)"] == pytest.approx(np.std(PSNR, ddof=1))
    assert ae["psnr ±95% (images)"] == pytest.approx(np.mean(HALF_WIDTHS))
    assert ae["ssim mean"] == pytest.approx(np.mean(PSNR) / 40)
    assert ae["ssim sd (seeds)"] == pytest.approx(np.std(np.array(PSNR) / 40, ddof=1))
    assert groups.loc["VAE beta=0.5", "psnr mean"] == pytest.approx(23.5)
    assert groups.loc["VAE beta=0.5", "psnr sd (seeds)"] == pytest.approx(np.std([24.0, 23.0], ddof=1))
    assert np.isnan(groups.loc["VAE beta=2", "psnr sd (seeds)"])  # one seed: no spread to tell


def test_seed_groups_refuses_a_store_without_test_metrics(read):
    runs = read("unscored")
    assert len(runs) == 1 and not any(c.startswith("metrics.") for c in runs)  # a metric no run logged: no column
    with pytest.raises(AevaeError, match="no model run with test metrics"):
        seed_groups(runs)


def test_rate_distortion_means_per_setting_and_what_each_step_buys(sweep):
    vae, refs = rate_distortion(sweep)
    assert list(vae["model.beta"]) == ["0.1", "1.0", "4.0"]  # the setting that varies, as logged; rate falls
    assert list(vae["label"]) == ["VAE beta=0.1", "VAE", "VAE beta=4"]
    assert list(vae["seeds"]) == [2, 2, 2]
    for i, beta in enumerate((0.1, 1.0, 4.0)):
        kl = [k for b, _, k, _, _ in SWEEP if b == beta]
        psnr = [p for b, _, _, p, _ in SWEEP if b == beta]
        mse = [m for b, _, _, _, m in SWEEP if b == beta]
        assert vae.loc[i, "rate_nats"] == pytest.approx(sum(kl) / 2)
        assert vae.loc[i, "rate_nats_sd"] == pytest.approx(abs(kl[0] - kl[1]) / 2 ** 0.5)
        assert vae.loc[i, "psnr"] == pytest.approx(sum(psnr) / 2)
        assert vae.loc[i, "psnr_sd"] == pytest.approx(abs(psnr[0] - psnr[1]) / 2 ** 0.5)
        assert vae.loc[i, "mse"] == pytest.approx(sum(mse) / 2)
    # beta 0.1 -> 1: KL 119 -> 62, PSNR 26.2 -> 23.8; beta 1 -> 4: KL 62 -> 21, PSNR 23.8 -> 21.25
    assert np.isnan(vae.loc[0, "psnr_db_per_nat"])
    assert vae.loc[1, "psnr_db_per_nat"] == pytest.approx((23.8 - 26.2) / (62 - 119))
    assert vae.loc[2, "psnr_db_per_nat"] == pytest.approx((21.25 - 23.8) / (21 - 62))
    assert list(refs["label"]) == ["AE"]  # the AE trained at another lr is no reference
    assert list(refs.columns) == ["label", "seeds", "psnr", "psnr_sd", "mse", "mse_sd"]
    assert refs.loc[0, "seeds"] == 2
    assert refs.loc[0, "psnr"] == pytest.approx(27.5)
    assert refs.loc[0, "psnr_sd"] == pytest.approx(np.std([28.0, 27.0], ddof=1))
    assert refs.loc[0, "mse"] == pytest.approx(0.0018)


def test_rate_distortion_of_vae_runs_alone_has_no_references(sweep):
    """`aevae rate-distortion --param model.kind=vae`: no model without a rate is left to compare with."""
    vae, refs = rate_distortion(filter_params(sweep, {"model.kind": "vae"}))
    assert list(vae["seeds"]) == [2, 2, 2]
    assert refs.empty


def test_rate_distortion_refuses_runs_that_differ_in_more_than_model_settings(read, sweep):
    mixed = read("mixed")
    assert list(mixed["run_id"].iloc[:-1]) == list(sweep["run_id"])  # the sweep, then the VAE at another lr
    with pytest.raises(AevaeError, match=r"the runs with a rate differ in lr as well as in their model settings: "
                                         r".*--param lr=0.01"):
        rate_distortion(mixed)
    vae, _ = rate_distortion(filter_params(mixed, {"lr": "0.001"}))  # what the message says to do
    assert list(vae["seeds"]) == [2, 2, 2]


def test_rate_distortion_needs_runs_with_a_rate(sweep):
    with pytest.raises(AevaeError, match="no training run of a model with a rate"):
        rate_distortion(filter_params(sweep, {"model.kind": "ae"}))


def test_rate_steps_one_line_per_step_with_its_signs(sweep):
    vae, _ = rate_distortion(sweep)
    lines = rate_steps(vae)
    assert lines == [
        f"VAE beta=0.1 -> VAE: KL -57.0 nats, PSNR -2.40 dB ({(23.8 - 26.2) / (62 - 119):+.4f} dB per nat of KL; "
        "means over 2+ seeds)",
        f"VAE -> VAE beta=4: KL -41.0 nats, PSNR -2.55 dB ({(21.25 - 23.8) / (21 - 62):+.4f} dB per nat of KL; "
        "means over 2+ seeds)",
    ]
    assert "(+0.0421 dB per nat" in lines[0]  # less KL costs PSNR: a positive price per nat
    assert rate_steps(vae.iloc[:1]) == []


def test_plot_rate_distortion_writes_a_png(sweep, tmp_path):
    vae, refs = rate_distortion(sweep)
    path = tmp_path / "figures" / "rate_distortion.png"
    plot_rate_distortion(vae, refs, path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["rate_distortion.png"]  # no temporary file left


def test_run_table_key_params_and_test_metrics(sweep):
    shown = run_table(sweep)
    assert list(shown.columns) == ["run_id", "model", "pipeline", "status", "started", *TRAINING_PARAMS,
                                   "model.beta", "model.latent_dim",  # each kind's own settings, where logged
                                   "test_psnr", "test_ssim", "test_lpips", "best_val_loss"]
    assert list(shown["run_id"]) == [r[:8] for r in sweep["run_id"]]
    assert list(shown["model.beta"].iloc[:2]) == ["0.1", "0.1"]
    assert shown["model.beta"].iloc[-3:].isna().all()  # the AEs log none
    assert list(shown["lr"]) == list(sweep["params.lr"])
    assert shown["epochs"].isna().all()  # a param no run logged
    assert list(shown["test_psnr"]) == list(sweep["metrics.test_psnr"])
    assert shown["best_val_loss"].isna().all()
    assert "train.device" not in shown and "test_mse" not in shown
