"""params.yaml's `tune:` section, checked by the tuning stage that reads it.

Kept out of aevae.config.schema, which every training imports: a new tuning option is a change to this
file only, and DVC retrains nothing."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from aevae import AevaeError
from aevae.config.load import load_section
from aevae.config.schema import OWN_TRAINING, Params, Section
from aevae.models.registry import model_class


class Range(Section):
    """One key of the search space: low..high, on a log scale or not; whole numbers when both bounds are."""

    low: float | int
    high: float | int
    log: bool = False

    @property
    def whole(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


def _default_space() -> dict[str, Range]:
    return {"lr": Range(low=1e-4, high=1e-2, log=True)}


class TuneParams(Section):
    trials: int = Field(0, ge=0)  # per model configuration; 0: no tuning, the study trains at params.yaml's settings
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)  # a trial's value: mean over these
    sampler_seed: int = 0
    startup_trials: int = Field(5, ge=1)  # TPE draws at random until this many trials are done
    epochs: int = Field(0, ge=0)  # epochs of a trial; 0: the study's
    space: dict[str, Range] = Field(default_factory=_default_space, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> TuneParams:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"tune.seeds lists a seed twice: {self.seeds}")
        for key, r in self.space.items():
            if r.low >= r.high:
                raise ValueError(f"tune.space.{key}: low ({r.low}) must be below high ({r.high})")
            if r.log and r.low <= 0:
                raise ValueError(f"tune.space.{key}: a log range needs low > 0, got {r.low}")
        return self


def load_tune_params(path: Path | str) -> TuneParams:
    return load_section(path, "tune", TuneParams)


def space_of(config: str, params: Params, tune: TuneParams) -> dict[str, Range]:
    """The keys of the space that configuration `config` has: the training settings every one has, and
    its kind's own settings (a VAE's beta, latent_dim)."""
    kind_keys = set(model_class(config, params).Settings.model_fields)
    return {key: r for key, r in tune.space.items() if key in OWN_TRAINING or key in kind_keys}


def check_space(params: Params, tune: TuneParams, path: Path | str) -> None:
    """Every key of tune.space is a training setting or a setting of some configuration's kind."""
    for key in tune.space:
        if not any(key in space_of(config, params, tune) for config in params.models):
            kinds = sorted({k for c in params.models for k in model_class(c, params).Settings.model_fields})
            raise AevaeError(f"{path}: tune.space.{key}: not a training setting ({', '.join(OWN_TRAINING)}) nor "
                             f"a setting of the study's kinds ({', '.join(kinds) or 'none'})")
        if key == "batch_size" and (not tune.space[key].whole or tune.space[key].low < 2):
            raise AevaeError(f"{path}: tune.space.batch_size: low and high must be whole numbers, low at least 2")
