import numpy as np
import pandas as pd

from aevae.images import GAP, TILE_SCALE, image_grid
from aevae.report import comparison_sentences


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


def summary_rows(metric: str, ae: float, vae: float, low: float, high: float) -> list[dict]:
    return [{"model": "ae", "metric": metric, "mean": ae, "ci_low": ae - 0.1, "ci_high": ae + 0.1},
            {"model": "vae", "metric": metric, "mean": vae, "ci_low": vae - 0.1, "ci_high": vae + 0.1},
            {"model": "ae-vae", "metric": metric, "mean": ae - vae, "ci_low": low, "ci_high": high}]


def test_comparison_claims_a_gap_only_when_the_paired_interval_excludes_zero():
    summary = pd.DataFrame([*summary_rows("psnr", 25.0, 21.0, 3.5, 4.5),
                            *summary_rows("ssim", 0.70, 0.69, -0.01, 0.03),
                            *summary_rows("lpips", float("nan"), float("nan"), float("nan"), float("nan"))])
    (paragraph,) = comparison_sentences(summary, {"ae": "AE", "vae": "VAE"})
    psnr, ssim, lpips = paragraph.split(". ")
    assert "AE 25.00 vs VAE 21.00" in psnr and "excludes zero" in psnr
    assert "includes zero" in ssim
    assert "not available" in lpips
