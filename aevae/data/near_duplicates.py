"""A cheap look across the train/test boundary of a folder for near-copies: the crops, resizes and frames of
one picture that, in the training split, let the test measure memory instead of generalisation.

The same test as the built-in set's (two images within 30 dB PSNR are the same picture to a reader), on
16x16 thumbnails, so that a shift of a few pixels or a re-encode still counts. It compares a seeded sample
of at most TEST_SAMPLE test images with every training image, streaming the training split in chunks:
time grows with the training split only, and memory stays at one chunk (bench/scale.md has the figures)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aevae.data.builtin import NEAR_DUPLICATE_PSNR_DB

THUMBNAIL = 16
TEST_SAMPLE = 2000
CHUNK = 2048  # training images per step: 24 MiB of them, and (TEST_SAMPLE x CHUNK) float32 distances, 16 MiB


@dataclass
class NearDuplicates:
    """What the look found: how many of the checked test images have a training image this close."""

    psnr_db: float
    thumbnail_px: int
    test_checked: int
    train_images: int
    found: int  # checked test images with a near-duplicate in the training split
    seconds: float
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (test index, train index), the first few


def _chunks(path: Path, rows: int = CHUNK) -> Iterator[np.ndarray]:
    """The (n, H, W, 3) uint8 rows of an .npy split file, `rows` at a time, read (not memory-mapped)."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_1_0(f)
        row_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            yield np.frombuffer(f.read(count * row_bytes), dtype=np.uint8).reshape(count, *shape[1:])


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(n, s, s, 3) uint8 -> (n, t * t * 3) float32 in [0, 1]: block means, t = 16 (8 when s is no multiple
    of 16; image sizes are multiples of 8)."""
    n, side = len(images), images.shape[1]
    t = THUMBNAIL if side % THUMBNAIL == 0 else 8
    f = side // t
    blocks = images.reshape(n, t, f, t, f, 3)
    # Summing the f x f strided views in integers is exact and about twice as fast as a float mean over axes.
    total = np.zeros((n, t, t, 3), dtype=np.uint16 if f * f * 255 <= np.iinfo(np.uint16).max else np.uint32)
    for i in range(f):
        for j in range(f):
            total += blocks[:, :, i, :, j, :]
    return (total.astype(np.float32) / (f * f * 255)).reshape(n, -1)


def _sample(path: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded sample of at most TEST_SAMPLE rows of a split file, as thumbnails, and their indices."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        n = np.lib.format.read_array_header_1_0(f)[0][0]
    picked = np.sort(np.random.default_rng([seed, 2]).permutation(n)[:TEST_SAMPLE])
    rows, start = [], 0
    for chunk in _chunks(path):
        mine = picked[(picked >= start) & (picked < start + len(chunk))] - start
        rows.append(thumbnails(chunk[mine]))
        start += len(chunk)
    return np.concatenate(rows), picked


def find_near_duplicates(folder: Path, seed: int, examples: int = 3, chunk_rows: int = CHUNK) -> NearDuplicates:
    """Look in `folder`'s test.npy (a seeded sample) for images within NEAR_DUPLICATE_PSNR_DB of any image
    of its train.npy, compared as thumbnails."""
    start = time.perf_counter()
    test, picked = _sample(folder / "test.npy", seed)
    test_norms = np.square(test).sum(axis=1)
    best_mse = np.full(len(test), np.inf, dtype=np.float32)
    best_train = np.zeros(len(test), dtype=np.int64)
    seen = 0
    for chunk in _chunks(folder / "train.npy", chunk_rows):
        train = thumbnails(chunk)
        # Squared distances by |a|^2 + |b|^2 - 2ab: one matrix product per chunk, not a loop over pairs.
        dist = test @ train.T  # then in place: one (sample x chunk) array, not four
        dist *= -2
        dist += test_norms[:, None]
        dist += np.square(train).sum(axis=1)[None, :]
        nearest = dist.argmin(axis=1)
        mse = np.maximum(dist[np.arange(len(test)), nearest], 0) / test.shape[1]
        better = mse < best_mse
        best_mse[better], best_train[better] = mse[better], nearest[better] + seen
        seen += len(chunk)
    close = np.flatnonzero(best_mse <= 10 ** (-NEAR_DUPLICATE_PSNR_DB / 10))  # PSNR >= the threshold
    side = int(round((test.shape[1] // 3) ** 0.5)) if len(test) else THUMBNAIL
    return NearDuplicates(NEAR_DUPLICATE_PSNR_DB, side, len(test), seen, len(close), time.perf_counter() - start,
                          [(int(picked[k]), int(best_train[k])) for k in close[:examples]])
