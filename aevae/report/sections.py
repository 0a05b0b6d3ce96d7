"""The report's sections, in order: data, models, training, reconstructions, metrics, differences,
comparison, likelihood, rate and distortion, sampling, interpolation, worst cases."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from aevae.config.schema import Params
from aevae.report.document import Section
from aevae.report.findings import code_size_finding, comparison_sentences, elbo_sentences, fid_sentences
from aevae.report.likelihood import likelihood_section
from aevae.report.params import ReportParams
from aevae.report.rate_distortion import rate_steps
from aevae.report.tables import architecture_rows
from aevae.report.trained import Trained
from aevae.report.tuning import Tuning, tuning_section
from aevae.results.names import INTERVAL_METHOD


@dataclass
class Study:
    """What the sections are written from: the params, the data's manifest, the models, the evaluation's
    results (eval.json, summary.csv, the two tables) and the report's own findings."""

    params: Params
    report: ReportParams
    bootstrap_samples: int
    manifest: dict
    trained: list[Trained]
    result: dict
    summary: pd.DataFrame
    tables: tuple[pd.DataFrame, pd.DataFrame]  # the metric table and the paired differences
    rated: pd.DataFrame  # rate-distortion points of the models with a rate
    worst_titles: list[str]
    tunings: list[Tuning] = field(default_factory=list)  # the configurations tuned before the study
    per_seed: pd.DataFrame = field(default_factory=pd.DataFrame)  # each training's test means and figures
    latents: pd.DataFrame = field(default_factory=pd.DataFrame)  # per latent dimension (latents.csv)


def _training_summary(t: Trained) -> str:
    best = t.best_epoch()
    return (f"{t.label} epoch {int(best['epoch'])} (val loss {best['val_loss']:.5g} {t.model.loss_unit}"
            f"{t.model.best_epoch_words(best.to_dict())})")


def _data_sentence(manifest: dict, units: int) -> str:
    counts = manifest["counts"]
    if manifest["source"] == "builtin":
        source = ("crops of the photographs shipped with scikit-image (" + ", ".join(manifest["photos"]) +
                  "); test crops come from grid cells of the photographs that no training crop touches, and no "
                  f"two test images are within {manifest['test_near_duplicate_psnr_db']:g} dB PSNR of each other. "
                  f"Crops of one cell overlap, so the {counts['test']} test images are {units} independent units "
                  "(cells), and intervals resample cells, not images. Six photographs are a demo set, not a "
                  "benchmark: use your own folder for publishable numbers")
    else:
        source = f"the images in {manifest['path']}, {_grouping_words(manifest, units)}"
    return (f"{counts['train']} training, {counts['val']} validation and {counts['test']} test images of "
            f"{manifest['image_size']}x{manifest['image_size']} RGB: {source}. {manifest['skipped_count']} "
            f"unreadable files skipped. Data sha256 {manifest['sha256'][:16]}.")


def _grouping_words(manifest: dict, units: int) -> str:
    """How a folder was split and what its test units are, with what the look for near-copies found."""
    groups = manifest.get("groups") or {"by": "file"}
    if groups["by"] == "file":
        words = "split at random file by file; each test file is its own unit"
    else:
        by = ("folder (each file's parent folder)" if groups["by"] == "folder" else
              f"the groups listed in {groups['by']}")
        per_split = groups["counts"]
        words = (f"split at random by {by}, whole groups to one split ({per_split['train']} training, "
                 f"{per_split['val']} validation and {per_split['test']} test groups; the fractions asked for "
                 f"{manifest['target_counts']['test']} test images); the test images are {units} independent "
                 "groups, and intervals resample groups, not images")
    found = manifest.get("near_duplicates")
    if not found:
        return words
    look = (f"{found['found']} of {found['test_checked']} test images checked have a near-duplicate in the "
            f"training split (within {found['psnr_db']:g} dB PSNR as {found['thumbnail_px']}px thumbnails), so "
            "the test partly measures memory, not generalisation" +
            ("" if groups["by"] != "file" else "; data.groups would keep such copies together (docs/data.md)")
            if found["found"] else
            f"no test image of the {found['test_checked']} checked has a near-duplicate in the training split "
            f"(within {found['psnr_db']:g} dB PSNR as {found['thumbnail_px']}px thumbnails)")
    return f"{words}. {look[0].upper()}{look[1:]}"


def unit_words(manifest: dict, units: int) -> str:
    """'N test images in U independent <units>' as the manifest says what a unit is."""
    kind = ("units (grid cells)" if manifest["source"] == "builtin" else
            "groups" if (manifest.get("groups") or {"by": "file"})["by"] != "file" else "units (files)")
    return f"{manifest['counts']['test']} test images in {units} independent {kind}"


def _setup(study: Study) -> list[Section]:
    params, trained, seeds = study.params, study.trained, study.params.train.seeds
    losses = "; ".join(f"{t.label}: {t.model.loss_unit}" for t in trained)
    return [
        Section("Data", [_data_sentence(study.manifest, int(study.result["test_units"]))]),
        Section("Models", [
            "All share the study's convolutional encoder (Conv 3-64-128-256, kernel 4, stride 2, BatchNorm, ReLU) "
            "and its mirrored ConvTranspose decoder with a Sigmoid output; they differ in what lies between."],
            table=architecture_rows(trained)),
        Section("Training", [
            f"Adam (lr {params.lr:g}, weight decay {params.weight_decay:g}), batch size {params.batch_size}"
            f"{_own_settings(study)}, "
            f"{params.epochs} epochs, ReduceLROnPlateau on validation loss (factor {params.train.plateau_factor:g}, "
            f"patience {params.train.plateau_patience}), training seeds {', '.join(map(str, seeds))}. "
            f"Losses: {losses}. The best-validation checkpoint of each training is evaluated; the figures show "
            f"seed {seeds[0]}.",
            "Best epoch: " + "; ".join(_training_summary(t) for t in trained) + "."], image="curves.png"),
        Section("Reconstructions", [
            f"{min(study.report.grid_images, study.manifest['counts']['test'])} test images drawn "
            f"at random (seed {params.seed}), one per independent unit before any unit repeats (their indices "
            "and units are in grid.csv). Models with a Gaussian latent reconstruct from its posterior mean, so "
            "every output is deterministic. Tiles are enlarged with nearest-neighbour, adding no blur."],
            image="grid.png"),
    ]


def _own_settings(study: Study) -> str:
    """The training settings that differ from the shared ones, per model (chosen by tuning, or set under
    models:)."""
    chosen = {t.name: t.chosen["settings"] for t in study.tunings}
    own = []
    for t in study.trained:
        mine = study.params.for_config(t.name, chosen.get(t.name))
        differ = [f"{key} {getattr(mine, key):g}" for key in ("lr", "weight_decay", "batch_size")
                  if getattr(mine, key) != getattr(study.params, key)]
        if differ:
            own.append(f"{t.label}: {', '.join(differ)}")
        elif t.name in chosen:
            own.append(f"{t.label}: the shared settings")
    return f" (per model, {'; '.join(own)})" if own else ""


def _results(study: Study) -> list[Section]:
    seeds, result, (table, pairs) = study.params.train.seeds, study.result, study.tables
    lpips_note = (f"LPIPS is v0.1 with the AlexNet backbone ({result['lpips_backbone']})."
                  if result["lpips_available"] else
                  "LPIPS is n/a: no AlexNet weights were found that passed their check (docs/metrics.md).")
    seed_words = (f"{len(seeds)} training seeds ({', '.join(map(str, seeds))}): each cell is the mean over seeds "
                  "of each seed's mean over the test images, ± the sd between seeds, [the 95% interval]"
                  if len(seeds) > 1 else
                  f"one training seed ({seeds[0]}): each cell is the mean over the test images [95% interval]. "
                  "The interval covers the test set only: how much another seed would move each model is "
                  "unmeasured (train.seeds: [0, 1, 2] measures it)")
    return [
        Section("Metrics on the test set", [
            f"{unit_words(study.manifest, int(result['test_units']))}; "
            f"{seed_words}. Interval method: {INTERVAL_METHOD}, {study.bootstrap_samples} resamples. PSNR is "
            "computed per image (data range 1) and then averaged; SSIM uses the Gaussian 11x11, sigma 1.5 window; "
            f"MSE is per pixel; {lpips_note}", *fid_sentences(result), *elbo_sentences(study.trained, result)],
            table=table),
        Section("Paired differences", [
            "Each model's score minus another's on the same test image and the same training seed, averaged; "
            "interval as above."], table=pairs),
        Section("Comparison", [*comparison_sentences(study.summary, {t.name: t.label for t in study.trained}),
                               *code_size_finding(study.summary, study.trained)]),
    ]


def _generation(study: Study) -> list[Section]:
    trained, generative = study.trained, [t for t in study.trained if t.model.generative]
    if not generative:
        return []
    others = " and ".join(f"the {t.label} ({t.model.code_values():,}-value code)" for t in trained
                          if not t.model.generative)
    names = ", ".join(t.label for t in generative)
    return [
        Section(f"Sampling ({names})", [
            "Images decoded from z ~ N(0, I), the same draws for each model." + (
                f" Their Sample FID and KID, over {study.result['test_images']} such images, are in the metric "
                "table." if study.result["fid_kid"]["computed"] else "") + (
                f" {others[0].upper()}{others[1:]} cannot do this: nothing in their training ties the code "
                "to a known distribution, so there is no prior to draw codes from, and points between two "
                "codes need not decode to images." if others else "")], image="samples.png"),
        Section("Interpolation", [
            f"Two test images (top, at the ends) and each model's decoding of {study.report.interpolation_steps} "
            "evenly spaced points on the line between their latent means: the first and last points are the "
            "two images' own reconstructions."], image="interpolation.png"),
    ]


def sections(study: Study) -> list[Section]:
    """Every section of the report, in order."""
    out = [*_setup(study)]
    if study.tunings:
        out.append(tuning_section(study.tunings))
    out += _results(study)
    likelihood = likelihood_section(study.trained, study.result, study.summary, study.per_seed, study.latents)
    if likelihood is not None:
        out.append(likelihood)
    if len(study.rated) >= 2:
        out.append(Section("Rate and distortion", [
            "Test KL (the rate, nats per image) against test PSNR and per-pixel MSE of every model with an ELBO; "
            "error bars are the sd over training seeds, dashed lines the models without a rate.",
            *(line + "." for line in rate_steps(study.rated))], image="rate_distortion.png"))
    out += _generation(study)
    out.append(Section(f"Worst test images (lowest PSNR, seed {study.params.train.seeds[0]})", study.worst_titles,
                       image="worst.png"))
    return out
