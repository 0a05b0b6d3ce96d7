"""How many images each split gets."""

from __future__ import annotations

import itertools

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


def group_split(sizes: list[int], val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many of the groups, taken in the (seeded random) order of `sizes`, go to test, then validation,
    then training: each cut falls on the group boundary nearest the images that the fraction asks for.

    Whole groups in random order, rather than groups packed to hit the sizes exactly: packing would keep
    the largest groups (the identity with most photos) out of the small test split, a selection the
    report could not show. Each split gets at least one group, so three groups are the least."""
    if len(sizes) < 3:
        raise AevaeError(f"{len(sizes)} group(s) of images are too few for the train/val/test split, which needs "
                         "three or more: add images of more groups, or check data.groups (docs/data.md, Groups)")
    target = split_sizes(sum(sizes), val_fraction, test_fraction)
    ends = list(itertools.accumulate(sizes))  # ends[k]: images in the first k + 1 groups

    def boundary(first: int, last: int, wanted: int) -> int:
        """The number of leading groups, in first..last, whose images come closest to `wanted`."""
        return min(range(first, last + 1), key=lambda k: abs(ends[k - 1] - wanted))

    test_end = boundary(1, len(sizes) - 2, target["test"])
    val_end = boundary(test_end + 1, len(sizes) - 1, ends[test_end - 1] + target["val"])
    return {"train": len(sizes) - val_end, "val": val_end - test_end, "test": test_end}
