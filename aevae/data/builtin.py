"""The built-in data: random crops of photographs that ship with scikit-image (no download), whole grid
cells of each photograph per split, so that no test crop shares a pixel with a training crop."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
from PIL import Image

from aevae import AevaeError
from aevae.data.params import DataParams
from aevae.data.split import split_sizes

# Real photographs that ship inside scikit-image, so the default pipeline needs no download.
# motorcycle_right is left out: it is the other half of a stereo pair and would leak into the test set.
BUILTIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle_left")
# Two test images this close are the same picture to a reader and count twice in every interval; a test
# crop closer than this to an earlier one is drawn again. 30 dB PSNR is an RMS difference of 3% of the range.
NEAR_DUPLICATE_PSNR_DB = 30.0
MAX_DRAWS_PER_TEST_IMAGE = 200


@functools.cache
def _builtin_photos() -> tuple[np.ndarray, ...]:
    import skimage.data  # only the built-in source needs scikit-image

    photos = []
    for name in BUILTIN_PHOTOS:
        photo = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
        photos.append(np.ascontiguousarray(photo[..., :3]))
    return tuple(photos)


def _cells(shape: tuple[int, ...], cell: int) -> list[tuple[int, int]]:
    rows, cols = shape[0] // cell, shape[1] // cell
    return [(r * cell, c * cell) for r in range(rows) for c in range(cols)]


def builtin_cells(params: DataParams, seed: int) -> tuple[dict[str, list[tuple[int, int, int]]], int]:
    """Assign whole grid cells (photo, top, left) of the built-in photographs to splits; returns cell side."""
    cell = params.image_size * 3 // 2  # crops of 0.75x-1.5x the output size: zoom variety, no upscaling blur
    cells = [(i, y, x) for i, photo in enumerate(_builtin_photos()) for y, x in _cells(photo.shape, cell)]
    order = np.random.default_rng(seed).permutation(len(cells))
    n = split_sizes(len(cells), params.val_fraction, params.test_fraction)
    ranges = {"test": (0, n["test"]), "val": (n["test"], n["test"] + n["val"]), "train": (n["test"] + n["val"], None)}
    return {split: [cells[k] for k in order[a:b]] for split, (a, b) in ranges.items()}, cell


def psnr_to_each(image: np.ndarray, others: np.ndarray) -> np.ndarray:
    """PSNR (dB, data range 1) of uint8 `image` against each uint8 image in `others`."""
    if len(others) == 0:
        return np.empty(0)
    diff = others.astype(np.float32) / 255 - image.astype(np.float32) / 255
    mse = np.square(diff).reshape(len(others), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(1 / mse)


def builtin_crops(params: DataParams, seed: int) -> Iterator[tuple[str, np.ndarray, str]]:
    """Random crops of the built-in photographs, yielded as (split, image, region: photograph:top:left).

    Each photograph is cut into a grid of cells and whole cells are assigned to a split; a crop never
    crosses its cell, so test images share no pixel with training images. No two test images are within
    NEAR_DUPLICATE_PSNR_DB of each other: a test crop that close to an earlier one is drawn again.
    """
    size = params.image_size
    cells_of, cell = builtin_cells(params, seed)
    photos = _builtin_photos()
    rng = np.random.default_rng([seed, 1])
    n_images = split_sizes(params.builtin_size, params.val_fraction, params.test_fraction)

    def draw(split: str) -> tuple[np.ndarray, str]:
        i, y, x = cells_of[split][rng.integers(len(cells_of[split]))]
        side = int(rng.integers(size * 3 // 4, cell + 1))
        dy, dx = rng.integers(0, cell - side + 1, size=2)
        crop = photos[i][y + dy: y + dy + side, x + dx: x + dx + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(image), f"{BUILTIN_PHOTOS[i]}:{y}:{x}"

    test = np.empty((n_images["test"], size, size, 3), dtype=np.uint8)
    for k in range(n_images["test"]):
        for _ in range(MAX_DRAWS_PER_TEST_IMAGE):
            test[k], region = draw("test")
            if not (psnr_to_each(test[k], test[:k]) >= NEAR_DUPLICATE_PSNR_DB).any():
                break
        else:
            raise AevaeError(f"cannot draw {n_images['test']} distinct built-in test images (no two within "
                             f"{NEAR_DUPLICATE_PSNR_DB:g} dB PSNR): lower data.builtin_size or data.test_fraction")
        yield "test", test[k], region
    for split in ("val", "train"):
        for _ in range(n_images[split]):
            yield split, *draw(split)
