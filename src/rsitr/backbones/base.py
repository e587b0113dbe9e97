"""The interface every image backbone implements, the static facts registered about it, and the registry.

A backbone family is one module of this package whose factory functions carry
:func:`register_backbone`; the registry imports every module of the package the first time a name
is looked up, so a new family needs no edit anywhere else (models are found the same way).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from rsitr.errors import ConfigError

#: ImageNet statistics, the input normalisation every torchvision-style backbone expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """The interface every image backbone offers to feature extraction and models.

    Attributes:
        name: registry name, e.g. ``"resnet50"``.
        level_channels: channels of each level returned by :meth:`forward_levels`.
        level_strides: downsampling factor of each level relative to the input.
        num_features: channels of :meth:`forward_features` (the pre-logits width).
    """

    name: str = ""
    level_channels: tuple[int, ...] = ()
    level_strides: tuple[int, ...] = ()
    num_features: int = 0
    #: state-dict key prefixes of classifier parts that weight loading skips (their class counts differ).
    head_prefixes: tuple[str, ...] = ("fc.",)

    def forward_levels(self, x: Tensor) -> list[Tensor]:
        """Feature maps of every level, finest first."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """The last (coarsest) feature map, before pooling."""
        return self.forward_levels(x)[-1]

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(convolution, BatchNorm) submodule names where the BatchNorm reads the convolution's output alone.

        :func:`rsitr.backbones.fold.fold_batchnorm` fuses these for frozen inference. Default: none
        (nothing is folded); a backbone lists a pair only where its forward applies the BatchNorm
        directly to that convolution's output and to nothing else.
        """
        return []

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool a :meth:`forward_features` map; classify unless ``pre_logits``."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a backbone, known without building it.

    Attributes:
        factory: builds the network with a fresh random init.
        level_channels: channels of each map :meth:`Backbone.forward_levels` returns.
        level_strides: downsampling factor of each of those maps relative to the input.
        level_names: the name of each level (used in feature specs, e.g. ``"layer3"``).
        input_size: the square input side the architecture was designed for (a default only).
        mean, std: the per-channel input normalisation of images in [0, 1] (preprocessing).
    """

    factory: Callable[..., Backbone]
    level_channels: tuple[int, ...]
    level_strides: tuple[int, ...]
    level_names: tuple[str, ...]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(name: str, level_channels: tuple[int, ...], level_strides: tuple[int, ...],
                      level_names: tuple[str, ...], input_size: int = 224) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator of a factory function: make it buildable as backbone ``name`` with these facts."""

    def wrap(factory: Callable[..., Backbone]) -> Callable[..., Backbone]:
        _REGISTRY[name] = BackboneInfo(factory, tuple(level_channels), tuple(level_strides), tuple(level_names),
                                       input_size=input_size)
        return factory

    return wrap


def _import_backbones() -> None:
    """Import every module of :mod:`rsitr.backbones` so that each registers its factories."""
    package = importlib.import_module("rsitr.backbones")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"rsitr.backbones.{info.name}")


def list_backbones() -> list[str]:
    """Names accepted by :func:`rsitr.backbones.create_backbone`, sorted."""
    _import_backbones()
    return sorted(_REGISTRY)


def backbone_info(name: str) -> BackboneInfo:
    """Static info of backbone ``name``.

    Raises:
        ConfigError: ``name`` is not registered; the message lists the available names.
    """
    if name not in _REGISTRY:
        _import_backbones()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r} (available: {', '.join(list_backbones())})") from None
