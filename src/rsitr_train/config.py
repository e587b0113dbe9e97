"""Run configuration: typed sections read from YAML, with ``section.key=value`` overrides.

A run's config has five sections, each a dataclass with one comment per field::

    data:     where the dataset is and how to read it
    features: the frozen backbone's inputs and the feature cache
    model:    the registered model name (or a YAML path) and parameter overrides
    text:     vocabulary and word vectors
    train:    optimisation, precision, end-to-end backbone training and the evaluation batch size

Unknown keys are errors (a key that does nothing is a trap), and the YAML is read with
``yaml.safe_load``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from rsitr.errors import ConfigError
from rsitr.features import default_cache_dir
from rsitr.features.spec import checked_bands
from rsitr.io import check_keys, list_yaml_names, read_named_yaml
from rsitr.precision import check_precision
from rsitr.progress import get_logger

logger = get_logger(__name__)


@dataclass
class DataConfig:
    path: str = ""  # dataset file or folder (Karpathy json, precomp folder, PIR json folder)
    layout: str = "auto"  # auto | karpathy | precomp | pir
    image_dir: str | None = None  # image folder when not beside the caption files
    name: str | None = None  # dataset name for cache keys and reports (default: from the path)
    train_split: str = "train"  # split used for training
    val_split: str = "val"  # the selection split: chooses the best epoch (never the reported split)
    selection_fraction: float = 0.0  # > 0: carve val_split out of train_split, this share of each scene class, seeded by split_seed (for train/val-only datasets; val_split must be a new name, e.g. select)
    selection_mode: str = "random"  # random | block: how the carve picks each class's images (block: the last ones in dataset order, as UCM/Sydney cut val)
    resplit: list[str] = field(default_factory=list)  # splits whose images are pooled and dealt out again at random, sizes kept, seeded by split_seed (DOVE Sec. IV-A: [train, val])
    split_seed: int = 0  # seed of selection_fraction and resplit
    exclude: str | None = None  # audit JSON (rsitr data audit) whose listed training items are dropped
    exclude_against: list[str] = field(default_factory=list)  # only the exclusions that collide with these evaluation splits ("rsitmd/test", or a dataset name); empty = all

    def __post_init__(self) -> None:
        if not 0 <= float(self.selection_fraction) < 1:
            raise ConfigError(f"data.selection_fraction must be in [0, 1), got {self.selection_fraction!r}")
        for name in ("resplit", "exclude_against"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ConfigError(f"data.{name} must be a list of names, got {value!r}")


@dataclass
class FeatureConfig:
    image_size: int = 256  # images are resized to a square of this side (paper: 256)
    backbone_weights: str | None = None  # torchvision-layout ResNet weights (.safetensors / .pth); None = seeded random init
    detections: str | None = None  # detections json with region boxes; None = built-in 36 multi-scale boxes
    precision: str = "bf16"  # fp32 | bf16 for the frozen backbone
    cache_dir: str = field(default_factory=default_cache_dir)  # where extracted features are cached
    batch_size: int = 32  # images per backbone forward pass
    backbone_seed: int = 0  # seed of the random backbone init when no weights are given (kept apart from train.seed so seeds share one cache)
    bands: list[int] | None = None  # TIFF source bands (1-based) that become R, G, B, e.g. [4, 3, 2]; null = the file's RGB, else bands 1-3

    def __post_init__(self) -> None:
        """``bands`` as a list of one or three band numbers; ``"4,3,2"`` (what ``--set features.bands=4,3,2`` gives) too."""
        value: Any = self.bands
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = [int(part) for part in value.split(",") if part.strip()]
        bands = checked_bands(value, "features.bands")
        self.bands = None if bands is None else list(bands)


@dataclass
class ModelConfig:
    name: str = "dove"  # registered model name or path to a model YAML
    params: dict[str, Any] = field(default_factory=dict)  # overrides of the model's parameters
    features: dict[str, Any] = field(default_factory=dict)  # overrides of the model's feature needs (image_size, maps, num_regions, region_level, boxes, dihedral)


@dataclass
class TextConfig:
    min_count: int = 1  # words seen fewer times in the train captions map to <unk>
    vocab: str | None = None  # an existing AMFMN-style vocabulary json instead of building one
    glove: str | None = None  # GloVe text file to initialise word vectors; None = random init
    max_length: int = 48  # captions are cut to this many tokens
    dataset_keywords: bool = True  # training captions read the dataset's keyword lists (RSITMD) when it has them; val/test captions never do


@dataclass
class TrainConfig:
    epochs: int = 50  # paper: 50
    batch_size: int = 100  # captions per batch (paper: 100)
    lr: float = 2e-4  # Adam learning rate (paper: 0.0002)
    lr_decay: float = 0.7  # multiply the learning rate by this ...
    lr_decay_every: int = 20  # ... every this many epochs (paper: 0.7 every 20)
    grad_clip: float = 2.0  # max gradient norm, applied after backward; 0 disables
    seed: int = 0  # seeds initialisation and batch order
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    precision: str = "fp32"  # fp32 | bf16: CPU bf16 autocast of the model's forward (training, validation); weights stay fp32
    train_backbone: bool = False  # train the backbone with the model (end to end) instead of reading cached features
    backbone_lr: float | None = None  # backbone's Adam learning rate (train_backbone); None = 0.1 × lr, gentle on pretrained weights
    augment: bool | None = None  # augment training images (flips, 90° turns, crop, colour); None = exactly when train_backbone
    mask_identical_captions: bool = False  # also keep word-for-word copies of an anchor's captions out of its negatives (rsitr_train.auxiliary)
    scene_loss: float = 0.0  # weight of an auxiliary scene-classification loss on the image embedding (train labels only); 0 = off
    patience: int = 0  # stop when the selection mR has not improved for this many epochs; 0 = run every epoch
    min_epochs: int = 0  # never stop early before this many epochs (early selection scores are noisy)

    def __post_init__(self) -> None:
        """One-line ConfigErrors for settings that cannot work (the older fields keep their free form)."""
        check_precision(self.precision, "train.precision")
        if not isinstance(self.train_backbone, bool):
            raise ConfigError(f"train.train_backbone must be true or false, got {self.train_backbone!r}")
        if self.augment is not None and not isinstance(self.augment, bool):
            raise ConfigError(f"train.augment must be true, false or null, got {self.augment!r}")
        if self.augment and not self.train_backbone:
            raise ConfigError("train.augment needs train.train_backbone: cached features of a frozen backbone cannot be augmented")
        if self.backbone_lr is not None:
            self.backbone_lr = _positive_float(self.backbone_lr, "train.backbone_lr", "or null for 0.1 × lr")
        if not isinstance(self.mask_identical_captions, bool):
            raise ConfigError(f"train.mask_identical_captions must be true or false, got {self.mask_identical_captions!r}")
        if self.scene_loss:
            self.scene_loss = _positive_float(self.scene_loss, "train.scene_loss", "or 0 for off")
        for name in ("patience", "min_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{name} must be a whole number >= 0, got {value!r}")

    @property
    def effective_backbone_lr(self) -> float:
        """The backbone's learning rate: ``backbone_lr``, else a tenth of ``lr``."""
        return float(self.backbone_lr) if self.backbone_lr is not None else 0.1 * self.lr

    @property
    def effective_augment(self) -> bool:
        """Whether training images are augmented: ``augment``, else exactly when the backbone trains."""
        return self.train_backbone if self.augment is None else bool(self.augment)


def _positive_float(value: Any, name: str, hint: str = "") -> float:
    """``value`` as a float > 0; YAML reads ``1e-5`` (no dot) as a string, so numeric strings count."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not number > 0:
        raise ConfigError(f"{name} must be a number > 0{f' ({hint})' if hint else ''}, got {value!r}")
    return number


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_SECTIONS: dict[str, type] = {
    "data": DataConfig, "features": FeatureConfig, "model": ModelConfig, "text": TextConfig, "train": TrainConfig,
}


#: Keys older configs may hold that no longer do anything; they are dropped with a log line.
RETIRED_KEYS = {
    "train.eval_batch_size": "evaluation encodes in fixed chunks, so no batch size can change a result",
}


#: Bounds of numeric fields (inclusive lower bound; ``>`` marks a strict one), checked when a config is read.
BOUNDS: dict[str, tuple[str, float]] = {
    "features.image_size": (">=", 16), "features.batch_size": (">=", 1), "train.epochs": (">=", 1),
    "train.batch_size": (">=", 1), "train.lr": (">", 0), "train.lr_decay": (">", 0), "train.lr_decay_every": (">=", 1),
    "train.grad_clip": (">=", 0), "train.threads": (">=", 0), "text.min_count": (">=", 1), "text.max_length": (">=", 1),
}


def _checked_value(value: Any, kind: Any, where: str) -> Any:
    """``value`` as the field's annotated type (int, float, str, bool, optionals of them); ConfigError otherwise.

    YAML reads ``1e-5`` (no dot) as a string, so a numeric string is a float; ``1.5`` is not an
    integer and ``true`` not a number.
    """
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and not isinstance(value, bool):
            with contextlib.suppress(TypeError, ValueError):
                number = float(value)
                if math.isfinite(number):
                    return number
        if option is str and isinstance(value, str):
            return value
    names = [getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options]
    if not any(o in (int, float, str, bool) for o in options):
        return value  # lists and mappings are checked by their section
    raise ConfigError(f"{where} must be {' or '.join(_KIND_WORDS.get(n, n) for n in names)}, got {value!r}")


_KIND_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "null": "null"}


def _check_bound(key: str, value: Any, where: str) -> None:
    if key not in BOUNDS or value is None:
        return
    relation, bound = BOUNDS[key]
    if not (value > bound if relation == ">" else value >= bound):
        raise ConfigError(f"{where} must be {relation} {bound:g}, got {value!r}")


def _build_section(name: str, values: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> Any:
    cls = _SECTIONS[name]
    for key in [k for k in values if f"{name}.{k}" in RETIRED_KEYS]:
        logger.info(f"{source}: ignoring {name}.{key} ({RETIRED_KEYS[f'{name}.{key}']})")
        del values[key]
    valid = [f.name for f in dataclasses.fields(cls)]
    typed = [(origins or {})[f"{name}.{k}"] for k in values if k not in valid and f"{name}.{k}" in (origins or {})]
    check_keys(values, valid, typed[0] if typed else source, prefix=f"{name}.")  # an unknown --set names itself
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        dotted = f"{name}.{key}"
        where = f"{(origins or {}).get(dotted, source)}: {dotted}"
        values[key] = _checked_value(value, hints[key], where)
        _check_bound(dotted, values[key], where)
    return cls(**values)


def config_from_dict(data: dict[str, Any], source: str = "config", origins: dict[str, str] | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from nested dicts, rejecting unknown sections and keys, wrong types and bounds.

    ``origins`` names where a ``section.key`` was set when not in ``source`` (an override:
    ``--set train.epochs=ten``), so an error points at what the user typed.
    """
    check_keys(data, _SECTIONS, source, "section")
    return RunConfig(**{name: _build_section(name, dict(data.get(name) or {}), source, origins) for name in _SECTIONS})


def describes(saved: Any, config: RunConfig) -> bool:
    """Whether a saved config mapping (a run's ``config.yaml``, a ``result.json`` entry) is ``config``.

    Keys it lacks take their defaults, so a run saved before a field existed still matches.
    """
    try:
        return isinstance(saved, dict) and config_from_dict(copy.deepcopy(saved)).to_dict() == config.to_dict()
    except (ConfigError, TypeError):
        return False


def configs_dir() -> Traversable:
    """The run recipes shipped with rsitr (``rsitr_train/configs``)."""
    return resources.files("rsitr_train") / "configs"


def list_configs() -> list[str]:
    """Names of the shipped run recipes (``--config NAME``)."""
    return list_yaml_names(configs_dir())


def read_config_file(name: str | Path) -> dict[str, Any]:
    """A run config's mapping: a YAML file given by path, or a shipped recipe given by name."""
    data, _ = read_named_yaml(name, configs_dir(), "run config", list_configs)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (a path or a shipped name; the defaults when None) and apply ``overrides``."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        data = read_config_file(path)
    origins = {}
    for item in overrides or []:
        apply_override(data, item)
        origins[item.partition("=")[0]] = f"--set {item}"
    return config_from_dict(data, source, origins)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` (or ``model.params.key=value``) in nested dicts; the value is parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
