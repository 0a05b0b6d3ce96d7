"""The `prepare` stage: images in (the built-in crops or a folder), uint8 train/val/test arrays, the test
images' independent units and a manifest out."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from aevae import AevaeError
from aevae.data.builtin import BUILTIN_PHOTOS, NEAR_DUPLICATE_PSNR_DB, builtin_crops
from aevae.data.decode import UnusableImage, list_files, load_image
from aevae.data.groups import Grouping, group_files
from aevae.data.load import MANIFEST, TEST_UNITS
from aevae.data.near_duplicates import find_near_duplicates
from aevae.data.params import DataParams
from aevae.data.split import SPLITS, group_split, split_sizes


@dataclass
class Prepared:
    """What `prepare` produced: per-split counts and the files it had to skip."""

    counts: dict[str, int]
    test_units: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)
    sha256: str = ""
    # A folder's: how its files were grouped, the groups per split, the images the fractions asked for, and
    # the near-duplicates of test images found in the training split (aevae.data.near_duplicates).
    grouping: dict | None = None
    targets: dict[str, int] | None = None
    near_duplicates: dict | None = None


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


def _decode_folder(root: Path, files: list[Path], wanted: int, size: int, staging: Path) -> tuple[list[str], list]:
    """Decode `files` in order until `wanted` are usable, appending their rows to `staging`; returns the
    used files and the skipped ones with their reasons (paths relative to `root`)."""
    used, skipped = [], []
    # Rows go straight to disk, in order, and are copied to the split files in chunks afterwards: memory
    # stays at one image and one chunk whatever the number of images (no memory map either, whose
    # pages would count against the process).
    with open(staging, "wb") as rows, tqdm(total=wanted, desc=f"prepare {root}", unit="img") as bar:
        for path in files:
            if len(used) == wanted:
                break
            try:
                rows.write(load_image(path, size).tobytes())
            except UnusableImage as err:
                skipped.append({"path": path.relative_to(root).as_posix(), "reason": str(err)})
                bar.set_postfix(skipped=len(skipped))
                continue
            used.append(path.relative_to(root).as_posix())
            bar.update()
    return used, skipped


def _in_group_order(files: list[Path], root: Path, grouping: Grouping, seed: int) -> list[Path]:
    """The files group by group, the groups in seeded random order (with data.groups: file, a seeded
    permutation of the files)."""
    members: dict[str, list[Path]] = {}
    for path in files:
        members.setdefault(grouping.of[path.relative_to(root).as_posix()], []).append(path)
    groups = list(members.values())
    return [path for k in np.random.default_rng(seed).permutation(len(groups)) for path in groups[k]]


def _split_counts(params: DataParams, used: list[str], grouping: Grouping) -> tuple[dict, dict, dict]:
    """Images per split, groups per split and the images the fractions asked for. The used files come
    group by group, so the splits are consecutive ranges of them."""
    targets = split_sizes(len(used), params.val_fraction, params.test_fraction)
    if not params.grouped:
        return targets, dict(targets), targets
    sizes = [len(list(run)) for _, run in itertools.groupby(used, key=grouping.of.__getitem__)]
    groups = group_split(sizes, params.val_fraction, params.test_fraction)
    ends = list(itertools.accumulate(sizes))
    test_end, val_end = ends[groups["test"] - 1], ends[groups["test"] + groups["val"] - 1]
    return {"train": len(used) - val_end, "val": val_end - test_end, "test": test_end}, groups, targets


def _write_splits(staging: Path, out: Path, counts: dict[str, int], size: int) -> None:
    """Copy the staged rows, in order, to test.npy, val.npy and train.npy, a chunk at a time."""
    with open(staging, "rb") as rows:
        for split in ("test", "val", "train"):
            with _open_npy(out / f"{split}.npy", counts[split], size) as f:
                remaining = counts[split] * size * size * 3
                while remaining:
                    chunk = rows.read(min(remaining, 1 << 26))
                    f.write(chunk)
                    remaining -= len(chunk)
    staging.unlink()


def _prepare_folder(params: DataParams, seed: int, out: Path) -> Prepared:
    root = Path(params.path)
    files, grouping = group_files(params, root, list_files(root))
    files = _in_group_order(files, root, grouping, seed)
    size, staging = params.image_size, out / "all.raw"
    used, skipped = _decode_folder(root, files, min(len(files), params.limit or len(files)), size, staging)
    if not used:
        raise AevaeError(f"data.path '{root}' holds no readable image ({len(files)} files tried, "
                         f"{len(skipped)} unusable): add JPEG/PNG/WebP/BMP images")
    counts, group_counts, targets = _split_counts(params, used, grouping)
    _write_splits(staging, out, counts, size)
    found = find_near_duplicates(out, seed)
    train_start = counts["test"] + counts["val"]
    return Prepared(counts=counts, test_units=[grouping.of[name] for name in used[: counts["test"]]],
                    skipped=skipped, targets=targets,
                    grouping={"by": grouping.by, "csv_sha256": grouping.csv_sha256, "counts": group_counts},
                    near_duplicates={**{k: v for k, v in asdict(found).items() if k != "pairs"},
                                     "examples": [{"test": used[t], "train": used[train_start + k]}
                                                  for t, k in found.pairs]})


def content_hash(folder: Path) -> str:
    """sha256 over the split arrays, so runs can record exactly which data they saw."""
    digest = hashlib.sha256()
    for split in SPLITS:
        with open(folder / f"{split}.npy", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _manifest(params: DataParams, seed: int, prepared: Prepared) -> dict:
    builtin = params.source == "builtin"
    return {
        "source": params.source,
        "path": None if builtin else params.path,
        "photos": list(BUILTIN_PHOTOS) if builtin else None,
        "image_size": params.image_size,
        "seed": seed,
        "val_fraction": params.val_fraction,
        "test_fraction": params.test_fraction,
        "counts": prepared.counts,
        "test_units": len(set(prepared.test_units)),  # independent units among the test images
        # A folder's grouping (data.groups) and groups per split, the images per split that the fractions asked
        # for, and the near-duplicates of test images found in the training split. (The built-in data's units
        # are grid cells; its manifest is as before, so that its data hash, and every training, stands.)
        **({} if builtin else {"groups": prepared.grouping, "target_counts": prepared.targets,
                               "near_duplicates": prepared.near_duplicates}),
        # built-in: no two test images within this PSNR of each other (near-duplicates redrawn)
        "test_near_duplicate_psnr_db": NEAR_DUPLICATE_PSNR_DB if builtin else None,
        "skipped_count": len(prepared.skipped),
        "skipped": prepared.skipped,
        "sha256": prepared.sha256,
    }


def prepare(params: DataParams, seed: int, out: Path) -> Prepared:
    """Build `out/{train,val,test}.npy` and `out/manifest.json`; `out` is replaced only on success."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        prepared = (_prepare_builtin if params.source == "builtin" else _prepare_folder)(params, seed, tmp)
        prepared.sha256 = content_hash(tmp)
        (tmp / MANIFEST).write_text(json.dumps(_manifest(params, seed, prepared), indent=2) + "\n", encoding="utf-8")
        with open(tmp / TEST_UNITS, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([("index", "unit"), *enumerate(prepared.test_units)])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return prepared
