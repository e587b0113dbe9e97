"""The interface every image backbone implements, and the static facts registered about it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


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
    """

    factory: Callable[[], Backbone]
    level_channels: tuple[int, ...]
    level_strides: tuple[int, ...]
    level_names: tuple[str, ...]
    input_size: int = 224
