"""How many images each split gets."""

from __future__ import annotations

from aevae import AevaeError

SPLITS = ("train", "val", "test")


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
