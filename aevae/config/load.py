"""Reading params.yaml: one section or the whole study, every problem one line naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from aevae import AevaeError
from aevae.config.schema import Params

DEFAULT_PARAMS = Path("params.yaml")
Schema = TypeVar("Schema", bound=BaseModel)

# Keys of earlier versions, and where they went.
MOVED = {"vae": "the VAE's settings moved under models: (models.vae.beta, models.vae.latent_dim)",
         "train.seed": "train.seed became train.seeds, a list (train.seeds: [0])"}


def _describe(error: dict, path: Path, prefix: str) -> str:
    key = (prefix + ".".join(str(part) for part in error["loc"])).rstrip(".") or "(top level)"
    if error["type"] == "extra_forbidden" and key.split(".")[0] in MOVED or key in MOVED:
        return f"{path}: unknown key '{key}': {MOVED.get(key) or MOVED[key.split('.')[0]]}"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}' (a typo?); see the keys documented in params.yaml"
    if error["type"] == "value_error":  # our own cross-field checks: the message names keys and values
        return f"{path}: {error['msg'].removeprefix('Value error, ')}"
    return f"{path}: {key}: {error['msg']} (got {error.get('input')!r})"


def read_yaml(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AevaeError(f"{path} not found: run from the repository root or pass --params") from None
    except yaml.YAMLError as err:
        raise AevaeError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise AevaeError(f"{path} must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def validated(schema: type[Schema], raw: Any, path: Path | str, prefix: str = "") -> Schema:
    """`raw` checked against `schema`; any problem is an AevaeError naming the key (under `prefix`)."""
    try:
        return schema.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise AevaeError("; ".join(_describe(e, Path(path), prefix) for e in err.errors())) from None


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml (the data, the models and their training)."""
    return validated(Params, read_yaml(path), path)


def load_section(path: Path | str, name: str, schema: type[Schema]) -> Schema:
    """One section of params.yaml (`eval`, `report`), checked by the schema of the stage that reads it."""
    raw = read_yaml(path).get(name)
    if raw is not None and not isinstance(raw, dict):
        raise AevaeError(f"{path}: {name} must be a mapping of keys to values, got {type(raw).__name__}")
    return validated(schema, raw, path, prefix=f"{name}.")
