"""Every model kind, and the study's model configurations built from params.yaml.

A kind registers itself when its module is imported (aevae.models.contract.Model); the imports below are
the list of kinds. A new kind's module is imported here (docs/models.md)."""

from __future__ import annotations

from pydantic import ValidationError

from aevae import AevaeError
from aevae.config.schema import Params
from aevae.models import ae, sigma_vae, vae  # noqa: F401 - each kind registers itself in MODELS
from aevae.models.contract import MODELS, Model


def model_class(name: str, params: Params) -> type[Model]:
    """The kind of the study's model configuration `name` (params.yaml `models.<name>`)."""
    if name not in params.models:
        raise AevaeError(f"no model configuration '{name}' under models: in params.yaml (there are: "
                         f"{', '.join(params.models)})")
    kind = params.models[name].kind
    if kind not in MODELS:
        raise AevaeError(f"models.{name}.kind: unknown model kind {kind!r}; expected one of {', '.join(MODELS)}")
    return MODELS[kind]


def build_model(name: str, params: Params) -> Model:
    """The study's model configuration `name` (params.yaml `models.<name>`), its settings checked."""
    cls = model_class(name, params)
    try:
        settings = cls.Settings.model_validate(params.models[name].settings())
    except ValidationError as err:
        problems = [(".".join(map(str, e["loc"])), e) for e in err.errors()]
        raise AevaeError("; ".join(
            f"params.yaml: models.{name}.{key}: " + (f"unknown key for kind {cls.kind!r} (a typo?)"
                                                     if e["type"] == "extra_forbidden" else
                                                     f"{e['msg']} (got {e.get('input')!r})")
            for key, e in problems)) from None
    return cls.from_settings(params.data.image_size, settings)
