"""The prepared data as the stages after `prepare` read it: the split arrays, the manifest and the test
images' independent units."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from aevae import AevaeError

MANIFEST = "manifest.json"
# Which independent unit each test image belongs to: a region (photograph, grid cell) of the built-in
# data, whose crops overlap; a file of a folder. Intervals resample units, not images.
TEST_UNITS = "test_units.csv"


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AevaeError(f"{path} not found: run the prepare stage first (dvc repro prepare)") from None


def read_test_units(folder: Path) -> list[str]:
    """The independent unit of each test image, in the test split's order (see TEST_UNITS)."""
    path = Path(folder) / TEST_UNITS
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return [row["unit"] for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise AevaeError(f"{path} not found: prepare the data again (dvc repro prepare)") from None


def load_split(folder: Path, split: str) -> np.ndarray:
    """The (N, H, W, 3) uint8 array of one split, read into memory once."""
    path = Path(folder) / f"{split}.npy"
    try:
        return np.load(path)
    except FileNotFoundError:
        raise AevaeError(f"{path} not found: run the prepare stage first (dvc repro prepare)") from None
