"""What the report says in words: each comparison, the code-size finding, FID/KID and the ELBO; every
claim bounded by what the intervals show."""

from __future__ import annotations

import math

import pandas as pd

from aevae.report.tables import model_pairs, summary_row
from aevae.report.trained import Trained
from aevae.results.names import HIGHER_IS_BETTER, LABELS, STUDY_METRICS, fmt


def _evidence(seeds: int) -> str:
    """What a paired interval that excludes zero shows, given the seeds behind it."""
    if seeds > 1:
        return f"the 95% interval over {seeds} training seeds and the test set's units excludes zero"
    return "the 95% interval over the test set's units excludes zero for this one training seed"


ONE_SEED_CAVEAT = ("With one training seed every interval here covers the test set only: the spread between seeds "
                   "is unmeasured and may be larger than these gaps (add seeds with train.seeds: [0, 1, 2]).")


def comparison_sentences(summary: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """One paragraph per pair of models: a sentence per metric, saying only what the means and the paired
    interval support."""
    paragraphs = []
    for a_name, b_name in model_pairs(summary, list(labels)):
        key, label_a, label_b = f"{a_name}-{b_name}", labels[a_name], labels[b_name]
        sentences = []
        for metric in STUDY_METRICS:
            a, b, diff = (summary_row(summary, name, metric) for name in (a_name, b_name, key))
            if math.isnan(a["mean"]) or math.isnan(b["mean"]) or math.isnan(diff["ci_low"]):
                sentences.append(f"{LABELS[metric]}, {label_a} vs {label_b}: not available for this run.")
                continue
            better_a = (a["mean"] > b["mean"]) == HIGHER_IS_BETTER[metric]
            (winner, win), (loser, lose) = ((label_a, a), (label_b, b)) if better_a else ((label_b, b), (label_a, a))
            direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
            if diff["ci_low"] > 0 or diff["ci_high"] < 0:
                verdict = _evidence(int(diff["seeds"]))
            else:
                verdict = "the 95% interval of the paired difference includes zero: no reliable difference"
            sentences.append(f"{LABELS[metric]} ({direction} is better): {winner} {fmt(win['mean'], metric)} vs "
                             f"{loser} {fmt(lose['mean'], metric)}; {verdict}.")
        paragraphs.append(" ".join(sentences))
    if paragraphs and (summary["seeds"] == 1).all():
        paragraphs.append(ONE_SEED_CAVEAT)
    return paragraphs


def code_size_finding(summary: pd.DataFrame, trained: list[Trained]) -> list[str]:
    """For each generative model: how much of the gap between the largest-code deterministic model and it
    remains against a deterministic model with its code size, in plain words."""
    names = [t.name for t in trained]
    deterministic = sorted((t for t in trained if not t.model.generative), key=lambda t: t.model.code_values())
    sentences = []

    def paired(a: Trained, b: Trained, metric: str) -> tuple[float, float, float]:
        """Mean and interval of a - b (the summary holds the pair in the order the models were scored)."""
        sign = 1 if names.index(a.name) < names.index(b.name) else -1
        first, second = (a, b) if sign == 1 else (b, a)
        row = summary_row(summary, f"{first.name}-{second.name}", metric)
        low, high = sorted((sign * row["ci_low"], sign * row["ci_high"]))
        return sign * row["mean"], low, high

    for g in (t for t in trained if t.model.generative):
        equal = next((t for t in deterministic if t.model.code_values() == g.model.code_values()), None)
        large = deterministic[-1] if deterministic else None
        if equal is None or equal is large:
            continue
        sentences.append(f"Equal code size: {large.label} keeps {large.model.code_values():,} numbers per image, "
                         f"{equal.label} and the {g.label} {g.model.code_values():,} each.")
        for metric in STUDY_METRICS:
            whole, part = paired(large, g, metric), paired(equal, g, metric)
            if any(math.isnan(v) for v in (*whole, *part)):
                continue
            f = lambda v, m=metric: fmt(v, m)
            # A share only means something when both gaps are real and point the same way.
            real = whole[1] * whole[2] > 0 and part[1] * part[2] > 0 and whole[0] * part[0] > 0
            share = f", {100 * part[0] / whole[0]:.0f}% of the whole gap," if real else ""
            sentences.append(
                f"{LABELS[metric]}: {large.label} - {g.label} = {f(whole[0])} [{f(whole[1])}, {f(whole[2])}]; at "
                f"equal code size {equal.label} - {g.label} = {f(part[0])} [{f(part[1])}, {f(part[2])}]{share} "
                "remains.")
    return sentences


def fid_sentences(result: dict) -> list[str]:
    """What the FID/KID rows mean, where their weights came from, or why they are missing (eval.json's fid_kid)."""
    status, n = result["fid_kid"], result["test_images"]
    if not status["computed"]:
        return [f"FID and KID: {status['status']}."]
    return [f"rFID and rKID compare each model's reconstructions with the {n} test images, Sample FID and KID as many "
            f"images decoded from seeded prior draws, on Inception-v3 pool features (weights: {status['source']}, "
            f"sha256 {status['sha256'][:12]}...; {status['preprocessing']}). FID is biased upward when the sets are "
            f"small (published FIDs use 50,000 images; Binkowski et al. 2018): with {n} images these values sit well "
            "above what the same models would score on 50,000, so compare them only with each other on this test "
            "set. KID is unbiased at any size, which is why it is here; its subsets sd is over "
            "random subsets of half the images. Every feature set is in metrics/inception/."]


def elbo_sentences(trained: list[Trained], result: dict) -> list[str]:
    """The test ELBO of each model that has one, in its own words (eval.json: means over seeds)."""
    sentences = []
    for t in trained:
        values = result.get(t.name, {})
        if t.model.neg_elbo_term and t.model.neg_elbo_term in values:
            sentences.append(f"{t.label} on the test split: {t.model.elbo_words(values)}, mean over seeds.")
    return sentences
