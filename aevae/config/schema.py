"""The keys of params.yaml that the data and every training read, typed and checked.

The `eval:` and `report:` sections, and `data:` but its image size, are checked by the stages that read them
(aevae.evaluate.params, aevae.report.params, aevae.data.params), not here: this module is in every
training's import closure, so DVC would retrain every model when such an option is added. Here they are
passed on as written.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class Section(BaseModel):
    # extra="forbid" turns a typo such as `learning_rate` into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TrainingData(BaseModel):
    """What every training reads of `data:`: the image size. The rest of the section (where the images come
    from, how they are split) is checked by the prepare stage, which reads it (aevae.data.params): a new data
    option is a change there, and DVC retrains nothing. Here those keys are passed on as written."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)
    image_size: int = Field(64, ge=8)

    @model_validator(mode="after")
    def _check_size(self) -> TrainingData:
        if self.image_size % 8:
            raise ValueError(
                f"data.image_size must be a multiple of 8 (three stride-2 convolutions), got {self.image_size}"
            )
        return self


# Training settings a configuration may set for itself (models.<name>.lr), falling back to the shared key:
# what tuning (tune:) chooses per configuration.
OWN_TRAINING = ("lr", "weight_decay", "batch_size")


class ModelEntry(BaseModel):
    """One model configuration of the study: its kind, that kind's settings and any training settings of
    its own (OWN_TRAINING). The kind's settings are checked against the kind's own schema (aevae.models),
    where the kind is defined, when the model is built."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str

    def settings(self) -> dict[str, object]:
        """The kind's settings (what the model is built from)."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in OWN_TRAINING}

    def training(self) -> dict[str, object]:
        """The training settings this configuration sets for itself."""
        return {k: v for k, v in (self.model_extra or {}).items() if k in OWN_TRAINING}


def _default_models() -> dict[str, ModelEntry]:
    return {"ae": ModelEntry(kind="ae"), "ae_code": ModelEntry(kind="ae_code", latent_dim=128),
            "vae": ModelEntry(kind="vae", latent_dim=128, beta=1.0, kl_warmup_epochs=0)}


class TrainParams(Section):
    # What training draws (weight init, batch order, the VAE's sampling noise), over the same data split:
    # each configuration is trained once per seed, and the report's intervals cover the seeds.
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    threads: int = Field(0, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"


class TrackingParams(Section):
    images_every: int = Field(2, ge=0)
    image_count: int = Field(8, ge=1, le=64)
    system_metrics: bool = True
    register_models: bool = False


class Params(Section):
    seed: int = 0
    lr: float = Field(0.002, gt=0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)  # BatchNorm needs at least two images per batch
    weight_decay: float = Field(1e-5, ge=0)
    models: dict[str, ModelEntry] = Field(default_factory=_default_models, min_length=1)
    data: TrainingData = TrainingData()  # the rest of data: is checked by aevae.data.params
    train: TrainParams = TrainParams()
    tracking: TrackingParams = TrackingParams()
    tune: dict[str, Any] = Field(default_factory=dict)  # checked by aevae.tune.params
    eval: dict[str, Any] = Field(default_factory=dict)  # checked by aevae.evaluate.params
    report: dict[str, Any] = Field(default_factory=dict)  # checked by aevae.report.params

    @model_validator(mode="after")
    def _check_study(self) -> Params:
        for name in self.models:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"models.{name}: a configuration's name is a folder and a DVC stage name: use "
                                 "letters, digits and _ only")
        if len(set(self.train.seeds)) != len(self.train.seeds):
            raise ValueError(f"train.seeds lists a seed twice: {self.train.seeds}")
        for name, entry in self.models.items():
            for key, value in entry.training().items():
                _own_setting(name, key, value)
        return self

    def for_config(self, config: str, settings: dict[str, object] | None = None) -> Params:
        """These params as configuration `config` trains with them: `settings` (chosen by tuning) merged
        into its entry, and its own training settings (models.<config>.lr) in place of the shared ones."""
        if settings:
            merged = {**self.models[config].model_dump(), **settings}
            self = Params.model_validate({**self.model_dump(), "models": {**self.models, config: merged}})
        return self.model_copy(update=self.models[config].training())

    def trainings(self) -> list[tuple[str, int]]:
        """The study: every (model configuration, training seed), in the report's order."""
        return [(config, seed) for config in self.models for seed in self.train.seeds]

    def flat(self) -> dict[str, object]:
        """`section.key -> value`, the naming DVC and MLflow use (nested sections joined with dots)."""
        return _flatten(self.model_dump())


def _own_setting(config: str, key: str, value: object) -> None:
    """models.<config>.<key> checked as the shared `key` is (type and bounds)."""
    field = Params.model_fields[key]
    try:
        TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(value, strict=True)
    except ValidationError as err:
        raise ValueError(f"models.{config}.{key}: {err.errors()[0]['msg']} (got {value!r})") from None


def _flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
