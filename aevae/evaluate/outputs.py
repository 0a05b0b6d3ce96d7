"""The evaluation's files: eval.json (DVC's metrics), per_image.csv, per_seed.csv and summary.csv."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pandas as pd

from aevae.evaluate.features import FidStatus
from aevae.files.atomic import atomic_path, write_text
from aevae.results.metrics_dir import MetricsDir
from aevae.results.names import FID_METRICS, INTERVAL, PER_IMAGE_METRICS


def _json_number(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


def write_results(out: MetricsDir, per_image: pd.DataFrame, per_seed: pd.DataFrame, summary: pd.DataFrame,
                  latents: pd.DataFrame, lpips_source: str | None, fid: FidStatus, likelihood: dict) -> dict:
    """eval.json (DVC metrics: each model's means over seeds), per_image.csv, per_seed.csv, summary.csv,
    latents.csv; returns eval.json's content. `likelihood`: how the bits/dim were computed."""
    models = list(dict.fromkeys(per_image["model"]))
    result: dict = {"test_images": int(per_image["index"].nunique()), "test_units": int(per_image["unit"].nunique())}
    for model in models:
        rows = summary[summary["model"] == model]
        seeds = per_seed[per_seed["model"] == model]
        entry = {row.metric: _json_number(row.mean) for row in rows.itertuples()}
        entry.update({name: _json_number(seeds[name].mean()) for name in seeds.columns  # ELBO, FID, KID, sd, units
                      if name not in ("model", "seed") and not name.startswith(PER_IMAGE_METRICS)
                      and seeds[name].notna().all()})
        if not fid.computed:
            entry.update({"fid": None, "kid": None})
        entry["seeds"] = [int(s) for s in seeds["seed"]]
        result[model] = entry
    result.update({"interval": INTERVAL, "lpips_available": lpips_source is not None,
                   "lpips_backbone": lpips_source, "fid_kid": asdict(fid), "likelihood": likelihood})
    lpips_note = f"AlexNet weights: {lpips_source}" if lpips_source else "no AlexNet weights: LPIPS missing"
    inception_note = f"Inception weights: {fid.source}, sha256 {fid.sha256}" if fid.computed else ""
    summary = summary.assign(source=np.select([summary["metric"] == "lpips", summary["metric"].isin(FID_METRICS)],
                                              [lpips_note, inception_note], ""))
    for frame, path in ((per_image, out.per_image), (per_seed, out.per_seed), (summary, out.summary),
                        (latents, out.latents)):
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6f", na_rep="NaN")
    write_text(out.eval_json, json.dumps(result, indent=2) + "\n")
    return result


