"""Where a run comes from: the commit, the data, the versions, and the pipeline execution it belongs to."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from aevae import __version__


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def pipeline_id(params: dict[str, Any]) -> str:
    """What groups the runs of one pipeline execution: the DVC experiment, else commit + params."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{git_commit()[:8]}-{digest}"


def run_tags(data_sha256: str, params: dict[str, Any]) -> dict[str, str]:
    """Tags of every run: provenance (commit, data, versions) and the DVC experiment it belongs to."""
    import torch

    tags = {"git_commit": git_commit(), "data_sha256": data_sha256, "pipeline": pipeline_id(params),
            "aevae_version": __version__, "torch_version": torch.__version__}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


@dataclass(frozen=True)
class Pipeline:
    """One pipeline execution as its stages log it: every param (flat) and the tags of every run."""

    params: dict[str, Any]
    tags: dict[str, str]

    @classmethod
    def of(cls, params: dict[str, Any], data_sha256: str) -> Pipeline:
        return cls(params, run_tags(data_sha256, params))

    @property
    def name(self) -> str:
        """The parent run's name: the DVC experiment's, or `repro-<commit>-<params>` for a workspace repro."""
        return os.environ.get("DVC_EXP_NAME") or f"repro-{self.tags['pipeline']}"
