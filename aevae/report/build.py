"""The report stage: the study's answers as files in one folder: grid.png, the metric tables, curves,
samples, worst cases, report.md and report.html.

Nothing here knows which models it shows: each brings its label, loss unit, code size, ELBO and whether
it can sample (aevae.models.contract); the order is the order of `models:` in params.yaml. Every claim is
bounded by the evidence: intervals cover the training seeds and the test set's independent units, and
with one seed the report says that the seed spread is unmeasured. The report reads the evaluation's files
(aevae.results), never its code, and logs nothing itself (stages/report.py logs the folder to MLflow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from aevae.config.schema import Params
from aevae.data.load import load_split, read_manifest, read_test_units
from aevae.files.atomic import atomic_path
from aevae.report.document import write_report
from aevae.report.figures import draw_samples, plot_curves
from aevae.report.grid import grid_picks, image_grid, save_png
from aevae.report.likelihood import plot_latent_kl
from aevae.report.params import ReportParams
from aevae.report.rate_distortion import plot_rate_distortion, rate_distortion_points
from aevae.report.sections import Study, sections
from aevae.report.tables import metric_table, paired_table
from aevae.report.trained import Trained, load_trained
from aevae.report.tuning import plot_tuning, read_tunings
from aevae.results.metrics_dir import MetricsDir

TITLE = "AutoEncoder vs Variational AutoEncoder"


def build_report(params: Params, report: ReportParams, bootstrap_samples: int, data_dir: Path, models_root: Path,
                 metrics: MetricsDir, out: Path, tuned: Path | None = None) -> list[Path]:
    """Write every figure, table and the report into `out`; returns the files written. `tuned`: the tuning
    stages' folder (tuned/), if the study was tuned."""
    out.mkdir(parents=True, exist_ok=True)
    manifest, test, units = read_manifest(data_dir), load_split(data_dir, "test"), read_test_units(data_dir)
    trained = load_trained(params, models_root, metrics)
    labels = {t.name: t.label for t in trained}
    per_image, per_seed = pd.read_csv(metrics.per_image), pd.read_csv(metrics.per_seed)
    summary, latents = pd.read_csv(metrics.summary), pd.read_csv(metrics.latents)

    _grid(test, units, trained, report.grid_images, params.seed, out)
    plot_curves(trained, out / "curves.png")
    generative = [t for t in trained if t.model.generative]
    if generative:
        draw_samples(generative, test, report.samples, report.interpolation_steps, params.seed, out)
    if not latents.empty:
        plot_latent_kl(latents, trained, params.train.seeds[0], out / "latents.png")
    rated, references = rate_distortion_points(per_seed, trained)
    if len(rated) >= 2:
        plot_rate_distortion(rated, references, out / "rate_distortion.png")
    worst_titles = _worst(test, per_image[per_image["seed"] == params.train.seeds[0]], trained, out)
    tables = metric_table(summary, labels), paired_table(summary, labels)
    for table, name in zip(tables, ("metrics.csv", "differences.csv")):
        with atomic_path(out / name) as tmp:
            table.to_csv(tmp, index=False)
    result = json.loads(metrics.eval_json.read_text(encoding="utf-8"))
    tunings = read_tunings(tuned, labels)
    if tunings:
        plot_tuning(tunings, out / "tuning.png")
    study = Study(params, report, bootstrap_samples, manifest, trained, result, summary, tables, rated, worst_titles,
                  tunings, per_seed, latents)
    write_report(out, sections(study), TITLE)
    return sorted(p for p in out.iterdir() if p.is_file())


def _grid(test: np.ndarray, units: list[str], trained: list[Trained], n_images: int, seed: int, out: Path) -> None:
    """grid.png (ground truth above each model's reconstructions) and grid.csv (which test images)."""
    picks = grid_picks(units, n_images, seed)
    with atomic_path(out / "grid.csv") as tmp:
        pd.DataFrame({"column": np.arange(len(picks)), "test_index": picks,
                      "unit": [units[i] for i in picks]}).to_csv(tmp, index=False)
    save_png(image_grid({"Ground Truth": test[picks], **{t.label: t.recon[picks] for t in trained}},
                        [f"#{i}" for i in picks]), out / "grid.png")


def _worst(test: np.ndarray, first_seed: pd.DataFrame, trained: list[Trained], out: Path) -> list[str]:
    """worst.png: each model's five lowest-PSNR test images beside its outputs; their captions."""
    rows, titles = {}, []
    for t in trained:
        worst = first_seed[first_seed["model"] == t.name].nsmallest(5, "psnr")
        idx = worst["index"].to_numpy()
        rows[f"{t.label}: truth"] = test[idx]
        rows[f"{t.label}: output"] = t.recon[idx]
        titles.append(f"{t.label}: " + ", ".join(f"#{i} {p:.1f} dB / SSIM {s:.2f}" for i, p, s in
                                                 zip(idx, worst["psnr"], worst["ssim"])) + ".")
    save_png(image_grid(rows), out / "worst.png")
    return titles
