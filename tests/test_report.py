import numpy as np
import pandas as pd
import pytest

from aevae.report.findings import ONE_SEED_CAVEAT, comparison_sentences
from aevae.report.grid import GAP, TILE_SCALE, grid_picks, image_grid


def tiles(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_grid_rows_of_different_lengths_are_all_drawn_and_blank_cells_stay_white():
    short, long = tiles(2, seed=1), tiles(8, seed=2)
    grid = np.asarray(image_grid({"ends": [short[0], *[None] * 6, short[1]], "line": long}))
    size = 8 * TILE_SCALE
    label_w = grid.shape[1] - 8 * (size + GAP) - GAP
    assert label_w > 0  # the width holds all eight columns of the long row

    def cell(row: int, col: int) -> np.ndarray:
        y, x = row * (size + GAP) + GAP, label_w + col * (size + GAP)
        return grid[y: y + size, x: x + size]

    # Nearest-neighbour: each tile is its image with every pixel repeated TILE_SCALE times, no blur.
    assert np.array_equal(cell(1, 7), long[7].repeat(TILE_SCALE, 0).repeat(TILE_SCALE, 1))
    assert np.array_equal(cell(0, 7), short[1].repeat(TILE_SCALE, 0).repeat(TILE_SCALE, 1))
    assert (cell(0, 3) == 255).all()


def summary_rows(metric: str, ae: float, vae: float, low: float, high: float, seeds: int) -> list[dict]:
    common = {"metric": metric, "seeds": seeds, "seed_sd": float("nan")}
    return [{"model": "ae", **common, "mean": ae, "ci_low": ae - 0.1, "ci_high": ae + 0.1},
            {"model": "vae", **common, "mean": vae, "ci_low": vae - 0.1, "ci_high": vae + 0.1},
            {"model": "ae-vae", **common, "mean": ae - vae, "ci_low": low, "ci_high": high}]


@pytest.mark.parametrize("seeds", [1, 3])
def test_comparison_claims_a_gap_only_when_the_paired_interval_excludes_zero(seeds):
    summary = pd.DataFrame([*summary_rows("psnr", 25.0, 21.0, 3.5, 4.5, seeds),
                            *summary_rows("ssim", 0.70, 0.69, -0.01, 0.03, seeds),
                            *summary_rows("lpips", float("nan"), float("nan"), float("nan"), float("nan"), seeds)])
    paragraph, *caveat = comparison_sentences(summary, {"ae": "AE", "vae": "VAE"})
    psnr, ssim, lpips = paragraph.split(". ")
    assert "AE 25.00 vs VAE 21.00" in psnr and "excludes zero" in psnr
    assert "includes zero" in ssim
    assert "not available" in lpips
    # One seed's interval covers the test set only: never a claim that the gap is not noise.
    assert "sampling noise" not in paragraph
    assert ("for this one training seed" in psnr) == (seeds == 1)
    assert (caveat == [ONE_SEED_CAVEAT]) == (seeds == 1) and "spread between seeds is unmeasured" in ONE_SEED_CAVEAT
    assert (f"over {seeds} training seeds" in psnr) == (seeds > 1)


def test_the_grid_shows_every_unit_once_before_any_unit_twice():
    units = ["a"] * 10 + ["b"] * 5 + ["c"] * 1 + ["d"] * 4
    picks = grid_picks(units, 4, seed=0)
    assert sorted(units[i] for i in picks) == ["a", "b", "c", "d"] and list(picks) == sorted(picks)
    assert len(set(grid_picks(units, 6, seed=0))) == 6
