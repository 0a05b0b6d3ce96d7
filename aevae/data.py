"""Data preparation: images in, uint8 train/val/test arrays and a manifest out."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from aevae import AevaeError
from aevae.params import DataParams

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
# Which independent unit each test image belongs to: a region (photograph, grid cell) of the built-in
# data, whose crops overlap; a file of a folder. Intervals resample units, not images.
TEST_UNITS = "test_units.csv"
# Real photographs that ship inside scikit-image, so the default pipeline needs no download.
# motorcycle_right is left out: it is the other half of a stereo pair and would leak into the test set.
BUILTIN_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "motorcycle_left")
# Errors Pillow raises for files that are not (complete, sane) images.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
               Image.DecompressionBombWarning)


class UnusableImage(Exception):
    """A file that is not a usable image; the message is the reason recorded in the manifest."""


def min_side(image_size: int) -> int:
    """Smaller images would be upscaled more than 4x into a blur, so they are skipped."""
    return max(1, image_size // 4)


@dataclass
class Prepared:
    """What `prepare` produced: per-split counts and the files it had to skip."""

    counts: dict[str, int]
    test_units: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    sha256: str = ""


# --------------------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), transparency over white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(img, dtype=np.float64)
        # Pillow's convert("L") clips 16-bit values at 255, which turns most 16-bit images white.
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def load_image(path: Path, image_size: int) -> np.ndarray:
    """Decode one file to an (image_size, image_size, 3) uint8 array, center-cropped to a square."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; treat that as the bomb it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, much faster
                img.load()
                img = to_rgb(ImageOps.exif_transpose(img))
        if min(img.size) < min_side(image_size):
            raise UnusableImage(f"too small: {img.width}x{img.height} px, at least {min_side(image_size)} px "
                                f"per side needed for {image_size}px images")
        img = ImageOps.fit(img, (image_size, image_size), Image.Resampling.BICUBIC)
    except _UNREADABLE as err:
        raise UnusableImage(f"{type(err).__name__}: {err}") from None
    return np.asarray(img, dtype=np.uint8)


def list_files(root: Path) -> list[Path]:
    """Every non-hidden regular file under `root`, sorted; symlinked folders are not followed."""
    if not root.exists():
        raise AevaeError(f"data.path '{root}' does not exist: create it and put images in it, "
                         "or set data.source: builtin")
    if not root.is_dir():
        raise AevaeError(f"data.path '{root}' is a file, not a folder: point data.path at the folder "
                         "that holds the images")
    files = []
    for folder, subdirs, names in os.walk(root):  # followlinks=False: a symlink loop cannot trap us
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files += [Path(folder, n) for n in names if not n.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


# --------------------------------------------------------------------------- splits


def split_sizes(total: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Images per split; every split gets at least one image or it is an error."""
    n_val, n_test = round(total * val_fraction), round(total * test_fraction)
    sizes = {"train": total - n_val - n_test, "val": n_val, "test": n_test}
    if min(sizes.values()) < 1 or sizes["train"] < 2:
        raise AevaeError(
            f"{total} usable images are too few for the train/val/test split "
            f"(val_fraction {val_fraction}, test_fraction {test_fraction} gives {sizes}): "
            "add images, or raise data.limit / data.builtin_size"
        )
    return sizes


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


# Two test images this close are the same picture to a reader and count twice in every interval; a test
# crop closer than this to an earlier one is drawn again. 30 dB PSNR is an RMS difference of 3% of the range.
NEAR_DUPLICATE_PSNR_DB = 30.0
MAX_DRAWS_PER_TEST_IMAGE = 200


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


# --------------------------------------------------------------------------- prepare


def _open_npy(path: Path, n: int, size: int) -> BinaryIO:
    """An .npy file for (n, size, size, 3) uint8 rows, header written; rows are appended in order."""
    f = open(path, "wb")  # noqa: SIM115 - returned open: the caller appends rows and closes it
    np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, size, size, 3)})
    return f


def _prepare_builtin(params: DataParams, seed: int, out: Path) -> Prepared:
    counts = split_sizes(params.builtin_size, params.val_fraction, params.test_fraction)
    files = {split: _open_npy(out / f"{split}.npy", n, params.image_size) for split, n in counts.items()}
    units = []
    try:
        for split, image, region in tqdm(builtin_crops(params, seed), total=params.builtin_size,
                                         desc="prepare builtin", unit="img"):
            files[split].write(image.tobytes())
            if split == "test":
                units.append(region)
    finally:
        for f in files.values():
            f.close()
    return Prepared(counts=counts, test_units=units)


def _prepare_folder(params: DataParams, seed: int, out: Path) -> Prepared:
    root = Path(params.path)
    files = list_files(root)
    files = [files[k] for k in np.random.default_rng(seed).permutation(len(files))]
    wanted = min(len(files), params.limit or len(files))
    size = params.image_size
    row_bytes = size * size * 3
    good, skipped, used = 0, [], []
    # Rows go straight to disk, in order, and are copied to the split files in chunks below: memory
    # stays at one image and one chunk whatever the number of images (no memory map either, whose
    # pages would count against the process).
    with open(out / "all.raw", "wb") as staging, tqdm(total=wanted, desc=f"prepare {root}", unit="img") as bar:
        for path in files:
            if good == wanted:
                break
            try:
                staging.write(load_image(path, size).tobytes())
            except UnusableImage as err:
                skipped.append({"path": path.relative_to(root).as_posix(), "reason": str(err)})
                bar.set_postfix(skipped=len(skipped))
                continue
            used.append(path.relative_to(root).as_posix())
            good += 1
            bar.update()
    if good == 0:
        raise AevaeError(f"data.path '{root}' holds no readable image ({len(files)} files tried, "
                         f"{len(skipped)} unusable): add JPEG/PNG/WebP/BMP images")
    counts = split_sizes(good, params.val_fraction, params.test_fraction)
    # The files were taken in seeded random order, so consecutive ranges are a random split.
    with open(out / "all.raw", "rb") as staging:
        for split in ("test", "val", "train"):
            with _open_npy(out / f"{split}.npy", counts[split], size) as f:
                remaining = counts[split] * row_bytes
                while remaining:
                    chunk = staging.read(min(remaining, 1 << 26))
                    f.write(chunk)
                    remaining -= len(chunk)
    (out / "all.raw").unlink()
    return Prepared(counts=counts, test_units=used[: counts["test"]], skipped=skipped)


def content_hash(folder: Path) -> str:
    """sha256 over the split arrays, so runs can record exactly which data they saw."""
    digest = hashlib.sha256()
    for split in SPLITS:
        with open(folder / f"{split}.npy", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def prepare(params: DataParams, seed: int, out: Path) -> Prepared:
    """Build `out/{train,val,test}.npy` and `out/manifest.json`; `out` is replaced only on success."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prepared = (_prepare_builtin if params.source == "builtin" else _prepare_folder)(params, seed, tmp)
        prepared.sha256 = content_hash(tmp)
        manifest = {
            "source": params.source,
            "path": params.path if params.source == "folder" else None,
            "photos": list(BUILTIN_PHOTOS) if params.source == "builtin" else None,
            "image_size": params.image_size,
            "seed": seed,
            "val_fraction": params.val_fraction,
            "test_fraction": params.test_fraction,
            "counts": prepared.counts,
            "test_units": len(set(prepared.test_units)),  # independent units among the test images
            # built-in: no two test images within this PSNR of each other (near-duplicates redrawn)
            "test_near_duplicate_psnr_db": NEAR_DUPLICATE_PSNR_DB if params.source == "builtin" else None,
            "skipped_count": len(prepared.skipped),
            "skipped": prepared.skipped,
            "sha256": prepared.sha256,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        with open(tmp / TEST_UNITS, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("index", "unit"), *enumerate(prepared.test_units)])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return prepared


# --------------------------------------------------------------------------- loading


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
