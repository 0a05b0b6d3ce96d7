"""Typed, validated view of params.yaml, loaded once per stage."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aevae import AevaeError

DEFAULT_PARAMS = Path("params.yaml")


class _Section(BaseModel):
    # extra="forbid" turns a typo such as `learning_rate` into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class DataParams(_Section):
    source: Literal["builtin", "folder"] = "builtin"
    path: str = "data/raw"
    image_size: int = Field(64, ge=8)
    builtin_size: int = Field(2000, ge=10)
    limit: int = Field(0, ge=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    test_fraction: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.image_size % 8:
            raise ValueError(
                f"data.image_size must be a multiple of 8 (three stride-2 convolutions), got {self.image_size}"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "data.val_fraction + data.test_fraction must be below 1 so that some images are left "
                f"for training, got {self.val_fraction} + {self.test_fraction}"
            )
        return self


class ModelEntry(BaseModel):
    """One model configuration of the study: its kind and that kind's settings. The settings are checked
    against the kind's own schema (aevae.models), where the kind is defined, when the model is built."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str

    def settings(self) -> dict[str, object]:
        return dict(self.model_extra or {})


def _default_models() -> dict[str, ModelEntry]:
    return {"ae": ModelEntry(kind="ae"), "ae_code": ModelEntry(kind="ae_code", latent_dim=128),
            "vae": ModelEntry(kind="vae", latent_dim=128, beta=1.0, kl_warmup_epochs=0)}


class TrainParams(_Section):
    # What training draws (weight init, batch order, the VAE's sampling noise), over the same data split:
    # each configuration is trained once per seed, and the report's intervals cover the seeds.
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    threads: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class EvalParams(_Section):
    batch_size: int = Field(100, ge=1)
    bootstrap_samples: int = Field(2000, ge=100)
    require_lpips: bool = False
    fid: Literal["auto"] | bool = "auto"  # FID/KID: auto = only on CUDA (Inception-v3 is slow on a CPU)
    require_fid: bool = False


class ReportParams(_Section):
    grid_images: int = Field(10, ge=1)
    samples: int = Field(16, ge=1)
    interpolation_steps: int = Field(8, ge=2)


class TrackingParams(_Section):
    images_every: int = Field(2, ge=0)
    image_count: int = Field(8, ge=1, le=64)
    system_metrics: bool = True
    register_models: bool = False


class Params(_Section):
    seed: int = 0
    lr: float = Field(0.002, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)  # BatchNorm needs at least two images per batch
    weight_decay: float = Field(1e-5, ge=0)
    models: dict[str, ModelEntry] = Field(default_factory=_default_models, min_length=1)
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    eval: EvalParams = EvalParams()
    report: ReportParams = ReportParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _check_study(self) -> Params:
        for name in self.models:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"models.{name}: a configuration's name is a folder and a DVC stage name: use "
                                 "letters, digits and _ only")
        if len(set(self.train.seeds)) != len(self.train.seeds):
            raise ValueError(f"train.seeds lists a seed twice: {self.train.seeds}")
        return self

    def trainings(self) -> list[tuple[str, int]]:
        """The study: every (model configuration, training seed), in the report's order."""
        return [(config, seed) for config in self.models for seed in self.train.seeds]

    def flat(self) -> dict[str, object]:
        """`section.key -> value`, the naming DVC and MLflow use (nested sections joined with dots)."""
        return _flatten(self.model_dump())


def _flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Keys of earlier versions, and where they went.
MOVED = {"vae": "the VAE's settings moved under models: (models.vae.beta, models.vae.latent_dim)",
         "train.seed": "train.seed became train.seeds, a list (train.seeds: [0])"}


def _describe(error: dict, path: Path) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden" and key.split(".")[0] in MOVED or key in MOVED:
        return f"{path}: unknown key '{key}': {MOVED.get(key) or MOVED[key.split('.')[0]]}"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}' (a typo?); see the keys documented in params.yaml"
    if error["type"] == "value_error":  # our own cross-field checks: the message names keys and values
        return f"{path}: {error['msg'].removeprefix('Value error, ')}"
    return f"{path}: {key}: {error['msg']} (got {error.get('input')!r})"


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; any problem is an AevaeError naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AevaeError(f"{path} not found: run from the repository root or pass --params") from None
    except yaml.YAMLError as err:
        raise AevaeError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise AevaeError(f"{path} must be a mapping of keys to values, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise AevaeError("; ".join(_describe(e, path) for e in err.errors())) from None
