"""A folder whose files come in groups (crops of a few pictures): data.groups keeps each group in one split
and makes the groups the test units; data.groups: file on the same folder warns of the near-copies that
straddle the split; intervals over groups are wider than over files, as they should be."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from aevae import AevaeError
from aevae.data.decode import load_image
from aevae.data.load import load_split, read_test_units
from aevae.data.near_duplicates import find_near_duplicates, thumbnails
from aevae.data.params import DataParams
from aevae.data.prepare import prepare
from aevae.evaluate.intervals import crossed_bootstrap
from tests.conftest import REPO, TINY, copy_project, merged, one_line_error, project_env, run

SIZE = 32


def picture(rng: np.random.Generator, detail: int) -> np.ndarray:
    """A smooth 200 px picture: `detail` x `detail` random colours, upsampled (more detail, harder to
    reconstruct: groups differ in difficulty, as identities or scenes do)."""
    small = rng.integers(0, 256, size=(detail, detail, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((200, 200), Image.Resampling.BICUBIC))


def write_crops(root: Path, flat: bool = False, groups: int = 40, seed: int = 0) -> dict[str, str]:
    """3 to 8 crops, shifted by 0-3 px, of each of `groups` pictures: in a folder per picture, or all in
    `root` with the picture in the name (`flat`). Returns each file's picture (relative path -> name)."""
    rng = np.random.default_rng(seed)
    of = {}
    for g in range(groups):
        pic = picture(rng, detail=4 + g % 8)
        for i in range(int(rng.integers(3, 9))):
            y, x = rng.integers(0, 4, size=2)
            name = f"pic{g:02d}_{i}.png" if flat else f"pic{g:02d}/crop_{i}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pic[20 + y: 180 + y, 20 + x: 180 + x]).save(root / name)
            of[name] = f"pic{g:02d}"
    return of


@pytest.fixture
def crops(tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "crops"
    return root, write_crops(root)


def groups_by_split(root: Path, of: dict[str, str], out: Path) -> dict[str, list[str]]:
    """The picture of every prepared image, found by decoding each file as prepare does."""
    picture_of = {load_image(root / name, SIZE).tobytes(): group for name, group in of.items()}
    return {split: [picture_of[image.tobytes()] for image in load_split(out, split)]
            for split in ("train", "val", "test")}


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, ...] = ("path", "group")) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.mark.parametrize("by", ["folder", "csv"])
def test_each_group_lies_in_one_split_and_the_test_units_are_the_groups(tmp_path, by, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a CSV lives in data/groups/ of the project
    root = tmp_path / "crops"
    of = write_crops(root, flat=by == "csv")
    groups = "folder" if by == "folder" else str(write_csv(Path("data/groups/pictures.csv"), sorted(of.items())))
    prepared = prepare(DataParams(source="folder", path=str(root), groups=groups, image_size=SIZE), 0, tmp_path / "p")
    found = groups_by_split(root, of, tmp_path / "p")
    assert sum(map(len, found.values())) == len(of)  # every file used once
    sets = {split: set(names) for split, names in found.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    for split, names in found.items():  # whole groups: every file of a group that is in a split
        assert all(names.count(g) == list(of.values()).count(g) for g in sets[split]), split
    assert read_test_units(tmp_path / "p") == found["test"]  # the units are the groups, image by image
    manifest = json.loads((tmp_path / "p/manifest.json").read_text())
    assert manifest["test_units"] == len(sets["test"]) >= 2
    assert manifest["groups"]["by"] == (groups if by == "csv" else "folder")
    assert manifest["groups"]["counts"] == {split: len(s) for split, s in sets.items()}
    assert manifest["counts"] == prepared.counts == {split: len(names) for split, names in found.items()}
    # Sizes as close to the fractions as whole groups in seeded order allow: off by under one group each.
    largest = max(list(of.values()).count(g) for g in set(of.values()))
    assert manifest["target_counts"]["test"] == round(len(of) * 0.1)
    for split in ("val", "test"):
        assert abs(manifest["counts"][split] - manifest["target_counts"][split]) <= largest / 2
    if by == "csv":
        assert manifest["groups"]["csv_sha256"] and manifest["groups"]["by"] == "data/groups/pictures.csv"


def test_the_grouped_split_is_seeded_and_a_limit_takes_whole_groups_in_order(crops, tmp_path):
    root, of = crops
    params = DataParams(source="folder", path=str(root), groups="folder", image_size=SIZE)
    prepare(params, 0, tmp_path / "a")
    prepare(params, 0, tmp_path / "b")
    prepare(params, 1, tmp_path / "c")
    tests = [read_test_units(tmp_path / x) for x in "abc"]
    assert tests[0] == tests[1] and tests[0] != tests[2]
    limited = prepare(params.model_copy(update={"limit": 50}), 0, tmp_path / "d")
    assert sum(limited.counts.values()) == 50
    found = groups_by_split(root, of, tmp_path / "d")
    assert {g for names in found.values() for g in names} <= set(of.values())
    used = [g for names in found.values() for g in names]
    assert sum(used.count(g) < list(of.values()).count(g) for g in set(used)) <= 1  # only the last group is cut


def test_a_file_split_of_grouped_files_warns_of_near_duplicates_across_the_split(crops, tmp_path):
    """Through the stage: the warning says how many, names an example pair and the fix; prepare succeeds."""
    root, of = crops
    results = {}
    for groups in ("file", "folder"):
        params = tmp_path / f"{groups}.yaml"
        params.write_text(json.dumps({"data": {"source": "folder", "path": str(root), "groups": groups,
                                               "image_size": SIZE}}))
        results[groups] = subprocess.run([sys.executable, REPO / "stages/prepare.py", "--params", params, "--out",
                                          tmp_path / groups], capture_output=True, text=True, cwd=tmp_path)
        assert results[groups].returncode == 0, results[groups].stderr
    file_split = json.loads((tmp_path / "file/manifest.json").read_text())["near_duplicates"]
    test_count = len(read_test_units(tmp_path / "file"))
    assert file_split["test_checked"] == test_count and file_split["train_images"] == len(of) - 2 * test_count
    assert file_split["found"] >= test_count // 2  # most test crops have a shifted copy in training
    examples = file_split["examples"]
    for pair in examples:  # each example: two crops of one picture, one in each split
        assert of[pair["test"]] == of[pair["train"]] and pair["test"] != pair["train"]
    # The examples are the first near-duplicates in the test split's order, three at most: what comparing
    # every pair of thumbnails finds (as test_the_look_finds_what_comparing_every_pair_finds does).
    test, train = (load_split(tmp_path / "file", split) for split in ("test", "train"))
    small_test, small_train = thumbnails(test), thumbnails(train)
    with np.errstate(divide="ignore"):  # some crops are exact copies: infinite PSNR
        psnr = -10 * np.log10(np.square(small_test[:, None, :] - small_train[None, :, :]).mean(axis=2))
    first = np.flatnonzero(psnr.max(axis=1) >= 30)[:3]
    assert len(examples) == len(first) == min(3, file_split["found"]) > 0
    for index, pair in zip(first, examples, strict=True):  # in order (an exact copy may sit at two indices)
        assert index in np.flatnonzero((test == load_image(root / pair["test"], SIZE)).all(axis=(1, 2, 3)))
    warning = f"{file_split['found']} of {test_count} test images checked have a near-duplicate in the training"
    assert warning in results["file"].stderr and "set data.groups: folder or a CSV" in results["file"].stderr
    assert json.loads((tmp_path / "folder/manifest.json").read_text())["near_duplicates"]["found"] == 0
    assert "near-duplicate" not in results["folder"].stderr


def test_the_look_finds_what_comparing_every_pair_finds(crops, tmp_path):
    """The chunked look (here 7 training images at a time) against PSNR between every pair of thumbnails."""
    root, _ = crops
    prepare(DataParams(source="folder", path=str(root), image_size=SIZE), 0, tmp_path / "p")
    look = find_near_duplicates(tmp_path / "p", 0, examples=100, chunk_rows=7)
    test, train = (thumbnails(load_split(tmp_path / "p", split)) for split in ("test", "train"))
    with np.errstate(divide="ignore"):  # some crops are exact copies: infinite PSNR
        psnr = -10 * np.log10(np.square(test[:, None, :] - train[None, :, :]).mean(axis=2))  # test x train
    assert look.test_checked == len(test) and look.train_images == len(train)
    assert look.found == int((psnr.max(axis=1) >= 30).sum()) > 0
    assert [t for t, _ in look.pairs] == list(np.flatnonzero(psnr.max(axis=1) >= 30))
    assert all(psnr[t, k] == psnr[t].max() for t, k in look.pairs)  # the nearest training image is named


def test_intervals_over_groups_are_wider_than_over_files(crops, tmp_path):
    """The same test images and scores (PSNR of a blurred copy, a stand-in for a model with a real metric):
    resampling the groups gives a wider interval than treating each crop as independent."""
    root, _ = crops
    prepare(DataParams(source="folder", path=str(root), groups="folder", image_size=SIZE), 0, tmp_path / "p")
    test = load_split(tmp_path / "p", "test").astype(np.float64) / 255
    blurred = test.reshape(len(test), SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(2, 4)).repeat(4, 1).repeat(4, 2)
    psnr = -10 * np.log10(np.square(blurred - test).reshape(len(test), -1).mean(axis=1))
    units = np.asarray(read_test_units(tmp_path / "p"))
    by_group = crossed_bootstrap(psnr[None, :], units, 2000, 0)
    by_file = crossed_bootstrap(psnr[None, :], np.arange(len(units)).astype(str), 2000, 0)
    assert by_group["units"] == len(set(units)) < by_file["units"] == len(units)
    assert by_group["mean"] == pytest.approx(by_file["mean"])
    assert by_group["ci_high"] - by_group["ci_low"] > 1.5 * (by_file["ci_high"] - by_file["ci_low"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_file", "pictures.csv, line 3: pic00_9.png is no file under data.path"),
        ("twice", "pictures.csv, line 4: pic00_0.png is listed twice (first on line 2)"),
        ("no_row", "has no row for 1 file(s) under data.path"),
        ("no_header", "the first line must name the columns path and group"),
        ("empty_group", "pictures.csv, line 2: a row needs a path and a group"),
        ("outside", "lies outside data.path"),
        ("two_groups", "2 group(s) of images are too few for the train/val/test split"),
    ],
)
def test_a_bad_grouping_is_a_one_line_error_and_writes_nothing(tmp_path, case, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "crops"
    of = write_crops(root, flat=case != "two_groups", groups=2 if case == "two_groups" else 4)
    rows = sorted(of.items())
    table = Path("data/groups/pictures.csv")
    if case == "missing_file":
        rows.insert(1, ("pic00_9.png", "pic00"))
    elif case == "twice":
        rows.insert(2, rows[0])
    elif case == "no_row":
        rows.pop()
    elif case == "empty_group":
        rows[0] = (rows[0][0], "")
    elif case == "outside":
        table = tmp_path / "elsewhere/pictures.csv"
    write_csv(table, rows, header=("file", "id") if case == "no_header" else ("path", "group"))
    groups = "folder" if case == "two_groups" else str(table)  # two_groups: two folders, one per picture
    with pytest.raises(AevaeError) as err:
        prepare(DataParams(source="folder", path=str(root), groups=groups, image_size=SIZE), 0, tmp_path / "p")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "p").exists() and not (tmp_path / "p.tmp").exists()


def test_the_stage_refuses_a_bad_csv_in_one_line_and_keeps_the_previous_output(tmp_path):
    root = tmp_path / "crops"
    of = write_crops(root, flat=True, groups=6)
    table = write_csv(tmp_path / "data/groups/pictures.csv", sorted(of.items()))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"data": {"source": "folder", "path": str(root), "groups": "data/groups/pictures.csv",
                                           "image_size": SIZE}}))
    stage = [sys.executable, REPO / "stages/prepare.py", "--params", params, "--out", tmp_path / "p"]
    assert subprocess.run(stage, capture_output=True, cwd=tmp_path).returncode == 0
    before = (tmp_path / "p/manifest.json").read_bytes()
    write_csv(table, [*sorted(of.items()), ("pic00_0.png", "pic05")])
    error = one_line_error(subprocess.run(stage, capture_output=True, text=True, cwd=tmp_path), "is listed twice")
    assert f"line {len(of) + 2}" in error
    assert (tmp_path / "p/manifest.json").read_bytes() == before


def test_a_csv_inside_the_folder_is_read_not_taken_for_an_image(tmp_path):
    root = tmp_path / "crops"
    of = write_crops(root, flat=True, groups=6)
    table = write_csv(root / "groups.csv", sorted(of.items()))
    prepared = prepare(DataParams(source="folder", path=str(root), groups=str(table), image_size=SIZE), 0,
                       tmp_path / "p")
    assert sum(prepared.counts.values()) == len(of) and prepared.skipped == []


@pytest.mark.slow(35)
def test_a_grouped_study_reports_its_groups_and_dvc_sees_the_csv_change(tmp_path_factory):
    """`dvc repro` of a study on a folder grouped by a CSV in data/groups/: evaluation and the report count groups;
    editing the CSV makes prepare stale. Slow (~35 s): a real dvc repro of a one-model study, on a folder of its
    own."""
    env = project_env(tmp_path_factory.mktemp("env"))
    repo = copy_project(tmp_path_factory.mktemp("grouped"), merged(TINY, {
        "data": {"source": "folder", "path": "data/raw", "groups": "data/groups/pictures.csv"}}))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"] = {"ae": params["models"]["ae"]}  # one model: the groups are what is tested
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    of = write_crops(repo / "data/raw", flat=True)
    write_csv(repo / "data/groups/pictures.csv", sorted(of.items()))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "grouped"], ["dvc", "repro"]):
        run(cmd, repo, env)
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    result = json.loads((repo / "metrics/eval.json").read_text())
    groups = manifest["groups"]["counts"]["test"]
    assert result["test_units"] == groups == manifest["test_units"] and result["test_images"] > groups
    per_image = pd.read_csv(repo / "metrics/per_image.csv")
    assert set(per_image["unit"]) <= set(of.values()) and per_image["unit"].nunique() == groups
    report = (repo / "reports/report.md").read_text()
    assert f"{manifest['counts']['test']} test images in {groups} independent groups" in report
    assert "the groups listed in data/groups/pictures.csv, whole groups to one split" in report
    write_csv(repo / "data/groups/pictures.csv", [(name, "one") if group == "pic00" else (name, group)
                                                  for name, group in sorted(of.items())])  # pic00 joins pic01
    status = run(["dvc", "status", "prepare"], repo, env).stdout
    assert "data/groups" in status and "modified" in status
