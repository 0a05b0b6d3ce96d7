"""params.yaml's `report:` section, checked by the report stage that reads it.

Kept out of aevae.config.schema, which every training imports: a new report option is a change to this
file only, and DVC retrains nothing."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from aevae.config.load import load_section
from aevae.config.schema import Section


class ReportParams(Section):
    grid_images: int = Field(10, ge=1)
    samples: int = Field(16, ge=1)
    interpolation_steps: int = Field(8, ge=2)


def load_report_params(path: Path | str) -> ReportParams:
    return load_section(path, "report", ReportParams)
