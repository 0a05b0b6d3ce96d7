"""The `features` stage: the test images' Inception-v3 features, the reference set of every FID and KID
(aevae.evaluate.fid), extracted once per data version.

Whether FID and KID are computed at all is decided here, once: inception.json says so, and when they are
not, why, how to turn them on and the extractor's measured cost per image.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from aevae import AevaeError
from aevae.config.schema import Params
from aevae.data.load import load_split
from aevae.evaluate.inception import Inception, InceptionUnavailable, find_inception
from aevae.evaluate.params import EvalParams
from aevae.files.atomic import atomic_path, write_text
from aevae.machine.device import cpu_isa, pick_device

log = logging.getLogger(__name__)


@dataclass
class FidStatus:
    """What the `features` stage decided and found: written as metrics/inception/test/inception.json,
    copied into eval.json as `fid_kid`."""

    computed: bool
    status: str  # "computed", or "not computed: <why>; <how to turn it on>", or "n/a: <why>"
    device: str
    source: str | None = None
    sha256: str | None = None
    preprocessing: str | None = None
    seconds_per_image: float | None = None
    test_images: int = 0

    @classmethod
    def read(cls, folder: Path) -> FidStatus:
        try:
            return cls(**json.loads((folder / "inception.json").read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise AevaeError(f"{folder / 'inception.json'} not found: run the features stage first "
                             "(dvc repro features)") from None

    def write(self, folder: Path) -> None:
        write_text(folder / "inception.json", json.dumps(asdict(self), indent=2) + "\n")

    def tag(self) -> str:
        """The weights behind the numbers, or why there are none: a tag on every MLflow run."""
        return f"{self.source} (sha256 {self.sha256})" if self.computed else self.status

    def note(self) -> str:
        """One line for the report and the logs."""
        if not self.computed:
            return f"FID and KID: {self.status}."
        return (f"Inception-v3 weights: {self.source}, sha256 {self.sha256[:12]}...; preprocessing: "
                f"{self.preprocessing}.")


def skip_reason(setting: bool | str, device: torch.device) -> str | None:
    """eval.fid: true computes, false does not, auto computes on CUDA only (on a CPU the extractor is the
    slowest part of the pipeline: docs/fid.md)."""
    if setting is False:
        return "eval.fid is false; dvc exp run -S eval.fid=true computes them"
    if setting == "auto" and device.type != "cuda":
        return (f"eval.fid is auto and this run's device is {device.type}, where Inception-v3 is slow; "
                "dvc exp run -S eval.fid=true computes them")
    return None


def _device_words(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_isa()})"


def extract_test_features(params: Params, settings: EvalParams, data_dir: Path, out: Path,
                          find: Callable[[], Inception] = find_inception) -> FidStatus:
    """The `features` stage: the test images' Inception features (out/features.npy) and out/inception.json.
    Not computed: measures the extractor's cost per image on a few test images instead, for the report.
    `find` searches the weights (a test passes find_inception with a weight file that is not there)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.npy").unlink(missing_ok=True)
    test, device = load_split(data_dir, "test"), pick_device(params.train.device)
    skip = skip_reason(settings.fid, device)
    try:
        inception = find()
    except InceptionUnavailable as err:
        if settings.require_fid:
            raise
        why = f"not computed: {skip}" if skip else "n/a"
        status = FidStatus(False, f"{why}; no Inception weights: {err} (eval.require_fid: true makes this an error)",
                           _device_words(device), test_images=len(test))
        log.warning(status.note())
        status.write(out)
        return status
    if skip:
        cost = inception.seconds_per_image(test, device)
        status = FidStatus(False, f"not computed: {skip} (measured {cost:.2f} s per image here, "
                                  f"{_device_words(device)})", _device_words(device),
                           seconds_per_image=round(cost, 4), test_images=len(test), **inception.describe())
    else:
        start = time.perf_counter()
        features = inception.features(test, device, desc="inception: test images")
        cost = (time.perf_counter() - start) / max(1, len(test))
        save_features(features, out / "features.npy")
        status = FidStatus(True, "computed", _device_words(device), seconds_per_image=round(cost, 4),
                           test_images=len(test), **inception.describe())
    log.info(status.note())
    status.write(out)
    return status


def save_features(features: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, features.astype(np.float32))
