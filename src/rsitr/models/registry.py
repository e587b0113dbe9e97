"""Model registry: names come from the YAML files in ``rsitr/models/configs``.

A model is one Python module that registers its architecture with :func:`register_architecture`
and one YAML file per named configuration::

    architecture: dove        # the registered class
    backbone: resnet50        # the frozen image backbone whose features it reads
    params:                   # fields of the architecture's config dataclass
      embed_dim: 512
    features:                 # optional: what the feature cache must hold for this model
      image_size: 299         #   (FeatureSpec fields: image_size, maps, num_regions, region_level,
                              #   boxes, dihedral)
      maps: ["mixed_7c:8"]
    reference:                # optional: what the paper reports, shown beside measured figures
      source: DOVE Table I
      parameters_m: 38

``create_model("dove", ...)`` reads ``dove.yaml``; an unknown name raises an error listing the
available ones, and an unknown parameter an error listing the valid fields.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from rsitr.errors import ConfigError, UnknownModelError
from rsitr.io import check_keys, list_yaml_names, read_named_yaml
from rsitr.models.base import RetrievalModel

_ARCHITECTURES: dict[str, tuple[type[RetrievalModel], type]] = {}


def register_architecture(name: str, config_class: type):
    """Class decorator: make ``cls`` constructible by architecture ``name`` from ``config_class``."""

    def wrap(cls: type[RetrievalModel]) -> type[RetrievalModel]:
        cls.architecture = name
        _ARCHITECTURES[name] = (cls, config_class)
        return cls

    return wrap


#: Feature-spec fields a model config may set (the rest belong to the run).
MODEL_FEATURE_FIELDS = ("image_size", "maps", "num_regions", "region_level", "boxes", "dihedral")


@dataclass
class ModelSpec:
    """A named model: architecture, backbone, parameter values and the features it needs."""

    name: str
    architecture: str
    backbone: str
    params: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_keys(self.features, MODEL_FEATURE_FIELDS, f"model {self.name!r}", "features field")

    def with_overrides(self, overrides: dict[str, Any], features: dict[str, Any] | None = None) -> ModelSpec:
        return dataclasses.replace(self, params={**self.params, **overrides}, features={**self.features, **(features or {})})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, "backbone": self.backbone,
                "params": dict(self.params), "features": dict(self.features)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        return cls(name=data["name"], architecture=data["architecture"], backbone=data["backbone"],
                   params=dict(data.get("params") or {}), features=dict(data.get("features") or {}))


def _config_dir():
    return resources.files("rsitr.models") / "configs"


def list_models() -> list[str]:
    """Names of all model configurations shipped with rsitr."""
    _import_models()
    return list_yaml_names(_config_dir())


def _read_model_yaml(name: str | Path) -> tuple[dict[str, Any], str]:
    return read_named_yaml(name, _config_dir(), "model", list_models, UnknownModelError)


def get_model_reference(name: str | Path) -> dict[str, Any]:
    """The ``reference`` section of a model config (paper figures such as ``parameters_m``), or {}."""
    return dict(_read_model_yaml(name)[0].get("reference") or {})


def get_model_spec(name: str | Path) -> ModelSpec:
    """The spec of a shipped model name, or of a user's YAML file given by path."""
    data, label = _read_model_yaml(name)
    for key in ("architecture", "backbone"):
        if key not in data:
            raise ConfigError(f"model config {label!r} lacks the {key!r} field")
    check_keys(data, ("architecture", "backbone", "params", "features", "reference"), f"model config {label!r}", "field")
    return ModelSpec(name=label, architecture=data["architecture"], backbone=data["backbone"],
                     params=dict(data.get("params") or {}), features=dict(data.get("features") or {}))


def build_config(architecture: str, params: dict[str, Any]):
    """The typed config dataclass of ``architecture`` filled from ``params`` (unknown keys rejected)."""
    _import_models()
    if architecture not in _ARCHITECTURES:
        raise UnknownModelError(f"unknown architecture {architecture!r}; available: {', '.join(sorted(_ARCHITECTURES))}")
    config_class = _ARCHITECTURES[architecture][1]
    check_keys(params, [f.name for f in dataclasses.fields(config_class)], architecture, "parameter")
    return config_class(**params)


def create_model(spec: ModelSpec | str, feature_dims: dict[str, Any], vocab_size: int, **overrides: Any) -> RetrievalModel:
    """Build a model from a name or spec.

    Args:
        spec: a registered model name, a YAML path, or a :class:`ModelSpec`.
        feature_dims: channel counts of the cached image features (``rsitr.features.feature_dims``).
        vocab_size: number of embedding rows (padding included).
        **overrides: config fields to replace.
    """
    if not isinstance(spec, ModelSpec):
        spec = get_model_spec(spec)
    spec = spec.with_overrides(overrides)
    config = build_config(spec.architecture, spec.params)
    # Subclasses take (config, feature_dims, vocab_size); the base class only declares config.
    model_class: Callable[..., RetrievalModel] = _ARCHITECTURES[spec.architecture][0]
    return model_class(config, feature_dims=feature_dims, vocab_size=vocab_size)


def _import_models() -> None:
    """Import every module of ``rsitr.models`` so that each registers its architecture.

    Kept lazy to avoid import cycles; a new model file needs no edit here.
    """
    import pkgutil

    import rsitr.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"rsitr.models.{info.name}")
