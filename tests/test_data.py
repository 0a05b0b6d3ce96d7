import json
import os

import numpy as np
import pytest
from PIL import Image

from aevae import AevaeError
from aevae.data.builtin import BUILTIN_PHOTOS, NEAR_DUPLICATE_PSNR_DB, builtin_cells, psnr_to_each
from aevae.data.decode import load_image
from aevae.data.load import load_split, read_test_units
from aevae.data.params import DataParams
from aevae.data.prepare import prepare
from aevae.data.split import split_sizes
from tests.conftest import random_photo


def folder_params(root, **kw):
    return DataParams(source="folder", path=str(root), **kw)


def test_builtin_is_deterministic_and_split_sizes_follow_the_fractions(tmp_path):
    params = DataParams(builtin_size=100)
    a = prepare(params, seed=3, out=tmp_path / "a")
    b = prepare(params, seed=3, out=tmp_path / "b")
    c = prepare(params, seed=4, out=tmp_path / "c")
    assert a.counts == {"train": 80, "val": 10, "test": 10}
    assert a.sha256 == b.sha256 != c.sha256
    test = load_split(tmp_path / "a", "test")
    assert test.shape == (10, 64, 64, 3) and test.dtype == np.uint8


def test_builtin_test_regions_share_no_pixel_with_training_regions():
    cells, side = builtin_cells(DataParams(), seed=0)
    def pixels(split):
        return {(photo, y + dy, x + dx) for photo, y, x in cells[split] for dy in range(side) for dx in range(side)}
    train = pixels("train")
    assert len(cells["test"]) >= 5 and len(cells["val"]) >= 5
    assert not train & pixels("test")
    assert not train & pixels("val")


def test_every_test_image_names_its_independent_unit(tmp_path, image_folder):
    """Built-in crops of one grid cell overlap: they are one unit; a folder's files are one unit each."""
    prepared = prepare(DataParams(builtin_size=200), seed=0, out=tmp_path / "builtin")
    units = read_test_units(tmp_path / "builtin")
    cells, side = builtin_cells(DataParams(), seed=0)
    assert len(units) == prepared.counts["test"] == 20
    photo, y, x = units[0].split(":")
    assert any((BUILTIN_PHOTOS.index(photo), int(y), int(x)) == c for c in cells["test"])
    assert len(set(units)) <= len(cells["test"]) < len(units)  # fewer units than images
    manifest = json.loads((tmp_path / "builtin" / "manifest.json").read_text())
    assert manifest["test_units"] == len(set(units))
    folder = prepare(DataParams(source="folder", path=str(image_folder), image_size=32), seed=0, out=tmp_path / "f")
    names = read_test_units(tmp_path / "f")
    assert len(names) == len(set(names)) == folder.counts["test"] and all((image_folder / n).is_file() for n in names)


def test_split_sizes_need_an_image_in_every_split():
    assert split_sizes(10, 0.1, 0.1) == {"train": 8, "val": 1, "test": 1}
    with pytest.raises(AevaeError, match="too few"):
        split_sizes(3, 0.1, 0.1)


def test_folder_split_is_deterministic_and_disjoint(image_folder, tmp_path):
    params = folder_params(image_folder, image_size=32)
    first = prepare(params, seed=0, out=tmp_path / "one")
    again = prepare(params, seed=0, out=tmp_path / "two")
    assert first.sha256 == again.sha256
    assert sum(first.counts.values()) == 24
    rows = {split: {arr.tobytes() for arr in load_split(tmp_path / "one", split)} for split in ("train", "val", "test")}
    assert not rows["train"] & rows["test"] and not rows["train"] & rows["val"]


def test_folder_limit_caps_the_number_of_images(image_folder, tmp_path):
    prepared = prepare(folder_params(image_folder, limit=12), seed=0, out=tmp_path / "out")
    assert sum(prepared.counts.values()) == 12


def test_bad_files_are_skipped_and_listed_and_hidden_ones_ignored(image_folder, tmp_path):
    (image_folder / "empty.jpg").write_bytes(b"")
    (image_folder / "notes.png").write_text("not an image")
    good = image_folder / "a" / "img_01.png"
    (image_folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    (image_folder / ".hidden.png").write_bytes(good.read_bytes())  # good images, hidden: never read
    (image_folder / ".thumbnails").mkdir()
    (image_folder / ".thumbnails" / "img_01.png").write_bytes(good.read_bytes())
    os.symlink(image_folder, image_folder / "loop")  # a symlink loop must not hang the scan
    out = tmp_path / "prepared"
    prepared = prepare(folder_params(image_folder), seed=0, out=out)
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = {s["path"] for s in manifest["skipped"]}
    assert skipped == {"empty.jpg", "notes.png", "truncated.png"}
    assert manifest["skipped_count"] == len(manifest["skipped"]) == len(prepared.skipped)
    assert sum(manifest["counts"].values()) == 24
    assert all(s["reason"] for s in manifest["skipped"])


def test_image_modes_are_converted_sensibly(tmp_path):
    # 16-bit grayscale: mid-grey must stay mid-grey, not clip to white.
    Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert abs(int(load_image(tmp_path / "g16.png", 8).mean()) - 127) <= 1
    # RGBA with a transparent background composites over white.
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", 8).min() == 255
    # Palette and CMYK end up as RGB.
    Image.new("P", (20, 20), 3).save(tmp_path / "p.gif")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    for name in ("p.gif", "cmyk.jpg"):
        assert load_image(tmp_path / name, 8).shape == (8, 8, 3)
    red = load_image(tmp_path / "cmyk.jpg", 8)[..., 0].mean()
    assert red > 200


def test_exif_orientation_is_applied(tmp_path):
    # A 40x20 (wide) image whose EXIF says "rotate 90": upright it is tall, left half black.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg", 16)
    # Rotated upright, the black half is on top and the white half at the bottom.
    assert out[:4].mean() < 60 and out[-4:].mean() > 200


@pytest.mark.parametrize("case", ["missing", "file", "empty", "only_bad"])
def test_unusable_folders_are_clear_errors(tmp_path, case):
    root = tmp_path / "data"
    if case == "file":
        root.write_text("x")
    elif case in ("empty", "only_bad"):
        root.mkdir()
        if case == "only_bad":
            (root / "a.png").write_text("nope")
    expected = {"missing": "does not exist", "file": "is a file", "empty": "no readable image",
                "only_bad": "no readable image"}[case]
    with pytest.raises(AevaeError, match=expected):
        prepare(folder_params(root), seed=0, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_prepare_keeps_the_previous_output(image_folder, tmp_path):
    out = tmp_path / "prepared"
    before = prepare(folder_params(image_folder), seed=0, out=out)
    with pytest.raises(AevaeError):
        prepare(folder_params(tmp_path / "missing"), seed=0, out=out)
    assert json.loads((out / "manifest.json").read_text())["sha256"] == before.sha256


def make_bomb(path):
    """A tiny file that declares 14000x14000 pixels (196M, over twice Pillow's limit)."""
    Image.new("1", (14000, 14000)).save(path)


def test_hostile_and_odd_files_are_skipped_with_reasons_or_used(image_folder, tmp_path):
    rng = np.random.default_rng(5)
    photo = Image.fromarray(random_photo(rng))
    make_bomb(image_folder / "bomb.png")
    Image.new("RGB", (1, 1), "red").save(image_folder / "dot.png")
    photo.save(image_folder / "été à la plage.jpg")  # non-ASCII and spaces
    photo.convert("CMYK").save(image_folder / "cmyk.jpg")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(image_folder / "palette.gif", transparency=0)
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(image_folder / "deep16.png")
    out = tmp_path / "prepared"
    manifest_skipped = {s["path"]: s["reason"] for s in (prepare(folder_params(image_folder), 0, out).skipped)}
    assert "DecompressionBomb" in manifest_skipped["bomb.png"]
    assert "too small: 1x1" in manifest_skipped["dot.png"]
    assert set(manifest_skipped) == {"bomb.png", "dot.png"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == 24 + 4  # the four odd but valid images are used


def test_too_few_images_for_the_splits_is_a_clear_error(tmp_path):
    root = tmp_path / "few"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(random_photo(rng)).save(root / f"{i}.png")
    with pytest.raises(AevaeError, match="3 usable images are too few"):
        prepare(folder_params(root), seed=0, out=tmp_path / "out")


def test_builtin_test_images_hold_no_near_duplicates(tmp_path):
    """Duplicates would count one picture twice and shrink every interval (30 dB: RMS 3% of the range)."""
    prepare(DataParams(builtin_size=600), seed=0, out=tmp_path / "p")
    test = load_split(tmp_path / "p", "test")
    assert len(test) == 60
    for i in range(len(test)):
        assert (psnr_to_each(test[i], np.delete(test, i, axis=0)) < NEAR_DUPLICATE_PSNR_DB).all(), i
    assert psnr_to_each(test[0], test[:1])[0] == np.inf  # the check sees an exact duplicate
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["test_near_duplicate_psnr_db"] == NEAR_DUPLICATE_PSNR_DB
