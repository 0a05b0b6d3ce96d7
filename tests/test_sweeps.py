"""aevae.compare's table functions, on small tables shaped as model_runs() returns them: one row per training
run, params as logged (strings, missing where a run did not log them), metrics as floats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from aevae import AevaeError
from aevae.compare.rate_distortion import rate_distortion
from aevae.compare.runs import distinct_trainings, filter_params, run_table, seed_groups
from aevae.report.rate_distortion import plot_rate_distortion, rate_steps
from aevae.results.names import TRAINING_PARAMS

METRIC_NAMES = ("psnr", "ssim", "lpips", "mse")


def row(run_id: str, model: str, seed: int, psnr: float, *, lr: str = "0.001", beta: str | None = None,
        kl: float | None = None, device: str = "cpu", threads: str = "2", half_width: float = 0.5,
        mse: float | None = None) -> dict:
    """One training run of configuration `model` as model_runs() lists it; a VAE when `beta` is given
    (label and params as aevae.train.stage logs them), else an AE (which logs no model.beta or model.latent_dim)."""
    vae = beta is not None
    label = ("VAE" if float(beta) == 1 else f"VAE beta={float(beta):g}") if vae else "AE"
    mse = 10 ** (-psnr / 10) if mse is None else mse
    values = {"psnr": psnr, "ssim": psnr / 40, "lpips": 1 - psnr / 40, "mse": mse}
    out = {"run_id": run_id, "model": model, "label": label, "pipeline": "exp-1", "status": "FINISHED",
           "started": "2025-01-01 12:00", "params.lr": lr, "params.train.seed": str(seed),
           "params.model.kind": "vae" if vae else "ae", "params.model.beta": beta,
           "params.model.latent_dim": "128" if vae else None, "params.train.device": device,
           "params.train.threads": threads}
    for name, value in values.items():  # each run's 95% interval over test images: half_width in PSNR's dB
        out[f"metrics.test_{name}"] = value
        out[f"metrics.test_{name}_ci_low"] = value - half_width * value / psnr
        out[f"metrics.test_{name}_ci_high"] = value + half_width * value / psnr
    out["metrics.test_kl_nats"] = kl
    return out


def table(*rows: dict) -> pd.DataFrame:
    """The rows as mlflow.search_runs builds its frame (one list per column, None where a run logged nothing
    of that name); a param or metric no run logged is no column at all."""
    columns = {key: [r.get(key) for r in rows] for key in dict.fromkeys(k for r in rows for k in r)}
    return pd.DataFrame({k: v for k, v in columns.items() if any(x is not None for x in v)})


# A beta sweep: the VAE at three betas, two seeds each, and the AE at the same settings (two seeds).
SWEEP = [  # (beta, seed, kl_nats, psnr, mse)
    ("0.1", 0, 120.0, 26.0, 0.0025), ("0.1", 1, 118.0, 26.4, 0.0023),
    ("1.0", 0, 60.0, 24.0, 0.0040), ("1.0", 1, 64.0, 23.6, 0.0044),
    ("4.0", 0, 20.0, 21.0, 0.0080), ("4.0", 1, 22.0, 21.5, 0.0075),
]


@pytest.fixture
def sweep() -> pd.DataFrame:
    vae = [row(f"v{beta}s{seed}{'x' * 30}", "vae", seed, psnr, beta=beta, kl=kl, mse=mse)
           for beta, seed, kl, psnr, mse in SWEEP]
    ae = [row("a0", "ae", 0, 28.0, mse=0.0016), row("a1", "ae", 1, 27.0, mse=0.0020),
          row("a2-other-lr", "ae", 0, 15.0, lr="0.1")]  # not trained at the VAEs' settings: no reference
    return table(*vae, *ae)


def test_a_configuration_trained_again_counts_once_its_latest_run():
    runs = table(row("first", "ae", 0, 20.0),
                 row("other-seed", "ae", 1, 21.0),
                 row("again", "ae", 0, 22.0),  # the same training, another experiment: replaces "first"
                 row("elsewhere", "ae", 1, 23.0, device="cuda", threads="16"),  # the same as "other-seed"
                 row("other-lr", "ae", 0, 24.0, lr="0.01"),
                 row("vae", "vae", 0, 25.0, beta="1.0", kl=50.0),
                 {**row("unscored", "ae", 2, 20.0), "metrics.test_psnr": np.nan})  # not evaluated: not a training
    distinct = distinct_trainings(runs)
    assert list(distinct["run_id"]) == ["again", "elsewhere", "other-lr", "vae"]
    assert list(distinct["metrics.test_psnr"]) == [22.0, 23.0, 24.0, 25.0]


def test_filter_params_keeps_rows_whose_params_equal_the_values(sweep):
    assert list(filter_params(sweep, {"lr": "0.1"})["run_id"]) == ["a2-other-lr"]
    kept = filter_params(sweep, {"model.beta": "1.0", "train.seed": 1})  # compared as logged: strings
    assert list(kept["run_id"]) == [f"v1.0s1{'x' * 30}"]
    assert filter_params(sweep, {"model.beta": "1"}).empty  # not as logged
    assert len(filter_params(sweep, {})) == len(sweep)


def test_filter_params_names_an_unknown_key(sweep):
    with pytest.raises(AevaeError, match=r"--param optimizer=adam: no run logged a param 'optimizer'"):
        filter_params(sweep, {"lr": "0.001", "optimizer": "adam"})


def test_seed_groups_mean_and_sd_over_seeds_and_the_mean_interval():
    psnr = [20.1, 20.5, 19.6]
    half_widths = [0.3, 0.5, 0.4]
    runs = table(*(row(f"a{seed}", "ae", seed, p, half_width=h, device=("cpu", "cuda", "mps")[seed])
                   for seed, (p, h) in enumerate(zip(psnr, half_widths))),
                 row("b0", "vae", 0, 24.0, beta="0.5", kl=80.0), row("b1", "vae", 1, 23.0, beta="0.5", kl=82.0),
                 row("c0", "vae", 0, 22.0, beta="2.0", kl=30.0))
    groups = seed_groups(runs).set_index("model")
    assert list(groups.index) == ["AE", "VAE beta=0.5", "VAE beta=2"]
    assert list(groups["model.beta"]) == ["", "0.5", "2.0"]  # what varies between trainings of a model
    assert "lr" not in groups and "train.device" not in groups  # the same everywhere / where it ran
    assert list(groups["seeds"]) == [3, 2, 1]
    ae = groups.loc["AE"]
    assert ae["psnr mean"] == pytest.approx(np.mean(psnr))
    assert ae["psnr sd (seeds)"] == pytest.approx(np.std(psnr, ddof=1))
    assert ae["psnr ±95% (images)"] == pytest.approx(np.mean(half_widths))
    assert ae["ssim mean"] == pytest.approx(np.mean(psnr) / 40)
    assert ae["ssim sd (seeds)"] == pytest.approx(np.std(np.array(psnr) / 40, ddof=1))
    assert groups.loc["VAE beta=0.5", "psnr mean"] == pytest.approx(23.5)
    assert groups.loc["VAE beta=0.5", "psnr sd (seeds)"] == pytest.approx(np.std([24.0, 23.0], ddof=1))
    assert np.isnan(groups.loc["VAE beta=2", "psnr sd (seeds)"])  # one seed: no spread to tell


def test_seed_groups_refuses_a_store_without_test_metrics():
    with pytest.raises(AevaeError, match="no model run with test metrics"):
        seed_groups(table({**row("a", "ae", 0, 20.0), "metrics.test_psnr": np.nan}))


def test_rate_distortion_means_per_setting_and_what_each_step_buys(sweep):
    vae, refs = rate_distortion(sweep)
    assert list(vae["model.beta"]) == ["0.1", "1.0", "4.0"]  # the setting that varies, as logged; rate falls
    assert list(vae["label"]) == ["VAE beta=0.1", "VAE", "VAE beta=4"]
    assert list(vae["seeds"]) == [2, 2, 2]
    for i, beta in enumerate(("0.1", "1.0", "4.0")):
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


def test_rate_distortion_refuses_runs_that_differ_in_more_than_model_settings(sweep):
    mixed = pd.concat([sweep, table(row("v-lr", "vae", 0, 25.0, lr="0.01", beta="1.0", kl=70.0))], ignore_index=True)
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
