"""params.yaml's `data:` section, checked by the prepare stage that reads it.

Kept out of aevae.config.schema, which every training imports (it checks only the image size, which training
reads): a new data option is a change to this file only, and DVC retrains nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from aevae.config.load import load_section
from aevae.config.schema import TrainingData

# data.groups: what must stay together in one split (docs/data.md, "Groups").
GROUPINGS = ("file", "folder")


class DataParams(TrainingData):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    source: Literal["builtin", "folder"] = "builtin"
    path: str = "data/raw"
    # file: each file is its own group; folder: each file's parent folder is one; or a CSV file (path,group)
    groups: str = "file"
    builtin_size: int = Field(2000, ge=10)
    limit: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "data.val_fraction + data.test_fraction must be below 1 so that some images are left "
                f"for training, got {self.val_fraction} + {self.test_fraction}"
            )
        if self.groups not in GROUPINGS and not self.groups.lower().endswith(".csv"):
            raise ValueError(f"data.groups must be file, folder or the path of a .csv file (path,group), got "
                             f"'{self.groups}' (docs/data.md, Groups)")
        if self.source == "builtin" and self.groups != "file":
            raise ValueError(f"data.groups: {self.groups} applies to data.source: folder; the built-in crops are "
                             "grouped by grid cell already: set data.source: folder, or data.groups: file")
        return self

    @property
    def grouped(self) -> bool:
        """Whether files come in groups (folder or CSV) rather than each on its own."""
        return self.groups != "file"


def load_data_params(path: Path | str) -> DataParams:
    return load_section(path, "data", DataParams)
