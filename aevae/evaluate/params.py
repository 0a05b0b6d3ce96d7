"""params.yaml's `eval:` section, checked by the stages that read it (features, evaluate, report).

Kept out of aevae.config.schema, which every training imports: a new evaluation option is a change to this
file only, and DVC retrains nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from aevae.config.load import load_section
from aevae.config.schema import Section


class EvalParams(Section):
    batch_size: int = Field(100, ge=1)
    bootstrap_samples: int = Field(2000, ge=100)
    require_lpips: bool = False
    fid: Literal["auto"] | bool = "auto"  # FID/KID: auto = only on CUDA (Inception-v3 is slow on a CPU)
    require_fid: bool = False
    iwae_samples: int = Field(64, ge=0)  # k of the IWAE bound per test image (bench/results.md: why 64); 0: off
    iwae_batch: int = Field(1000, ge=1)  # decodes per pass: bounds the likelihood's memory (~0.3 GB at 64 px)


def load_eval_params(path: Path | str) -> EvalParams:
    return load_section(path, "eval", EvalParams)
