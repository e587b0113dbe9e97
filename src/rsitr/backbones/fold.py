"""A frozen backbone's forward with each BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = (x - mean) / sqrt(var + eps) *
gamma + beta``; directly after a convolution it merges into it: the weights are scaled by
``s = gamma / sqrt(var + eps)`` per output channel and the bias becomes ``(b - mean) * s + beta``
(``b = 0`` for a convolution without bias). That removes one full pass over every activation map
from each forward. The fused network computes the same function: in float32 the outputs agree up
to float rounding (about 1e-6 relative); under bf16 autocast the convolution reads the fused
weights rounded to bfloat16 instead of rounding its own output before the BatchNorm, so the maps
differ by bfloat16 rounding only.

:func:`folded_forward_levels` fuses the weights afresh at every call, from the backbone's current
parameters and statistics, and runs a weightless copy of the network (its "skeleton": the same
modules with identities in place of the folded BatchNorms, on the ``meta`` device) with them
through :func:`torch.func.functional_call`. Nothing is cached but the skeleton, so no weight
change can be missed: an optimiser step (fused Adam counts no tensor versions), loaded weights,
BatchNorm statistics updated by a forward in train mode. The fusion costs one pass over the
convolution weights, which replaces the pass autocast spends casting them to bfloat16 when
``weight_dtype`` is that dtype (the fused weights are produced in it directly, rounded once from
float32 as autocast would round them).

Which convolution feeds which BatchNorm is architecture knowledge: each backbone names its pairs in
:meth:`rsitr.backbones.base.Backbone.conv_bn_pairs` (an empty list folds nothing).
"""

from __future__ import annotations

import copy
import threading
import weakref

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rsitr.backbones.base import Backbone

_LOCK = threading.Lock()
#: The parameter and buffer names, shapes and dtypes a skeleton was built for (a changed module rebuilds it).
_Layout = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class _Levels(nn.Module):
    """``net.forward_levels`` as ``forward``, so that :func:`torch.func.functional_call` can run it."""

    def __init__(self, net: Backbone) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.net.forward_levels(x)


#: Per live backbone: (its layout, its folded pairs, the skeleton). Weak keys: a dropped backbone frees its entry.
_SKELETONS: weakref.WeakKeyDictionary[Backbone, tuple[_Layout, list[tuple[str, str]], _Levels]] = weakref.WeakKeyDictionary()


def _layout(model: nn.Module) -> _Layout:
    named = (*model.named_parameters(), *model.named_buffers())
    return tuple((name, tuple(t.shape), t.dtype) for name, t in named)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root``."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def foldable_pairs(model: Backbone) -> list[tuple[str, str]]:
    """The pairs of ``model.conv_bn_pairs()`` that fold: a Conv2d and a BatchNorm2d with running statistics.

    Raises:
        TypeError: a named pair is not a Conv2d and a BatchNorm2d (a wrong ``conv_bn_pairs``).
    """
    pairs = []
    for conv_name, bn_name in model.conv_bn_pairs():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"{model.name}: {conv_name}/{bn_name} is not a Conv2d/BatchNorm2d pair")
        if bn.running_mean is not None and bn.running_var is not None:  # else eval mode uses batch statistics
            pairs.append((conv_name, bn_name))
    return pairs


def _build_skeleton(model: Backbone, pairs: list[tuple[str, str]]) -> _Levels:
    """A copy of ``model`` without data (``meta`` tensors), folded BatchNorms as identities, a bias on every folded conv."""
    memo: dict[int, object] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
    skeleton = copy.deepcopy(model, memo).eval()
    for conv_name, bn_name in pairs:
        conv = skeleton.get_submodule(conv_name)
        assert isinstance(conv, nn.Conv2d)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.empty(conv.out_channels, device="meta"), requires_grad=False)
        _set_submodule(skeleton, bn_name, nn.Identity())
    return _Levels(skeleton)


def _skeleton(model: Backbone) -> tuple[list[tuple[str, str]], _Levels]:
    """The folded pairs and the skeleton of ``model``, built once per module layout."""
    layout = _layout(model)
    with _LOCK:
        cached = _SKELETONS.get(model)
    if cached is not None and cached[0] == layout:
        return cached[1], cached[2]
    pairs = foldable_pairs(model)
    skeleton = _build_skeleton(model, pairs)
    with _LOCK:
        _SKELETONS[model] = (layout, pairs, skeleton)
    return pairs, skeleton


def fused_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(weight, bias) of ``conv`` followed by ``bn`` in eval mode, computed in float32 and rounded once to ``dtype``.

    ``s = gamma / sqrt(var + eps)``, weight ``w * s`` per output channel, bias ``(b - mean) * s + beta``
    (gamma 1 and beta 0 for a BatchNorm without affine parameters). The weight keeps the memory
    layout of ``conv.weight`` (channels_last stays channels_last); ``dtype`` None keeps float32.
    """
    assert bn.running_mean is not None and bn.running_var is not None
    wide = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(wide)
    bias = -bn.running_mean.to(wide) if conv.bias is None else conv.bias.to(wide) - bn.running_mean.to(wide)
    bias = bias * scale + (bn.bias.to(wide) if bn.bias is not None else 0.0)
    weight = conv.weight.to(wide) * scale.reshape(-1, 1, 1, 1)
    target = dtype or wide
    return weight.to(target, memory_format=torch.preserve_format), bias.to(target)


def folded_forward_levels(model: Backbone, images: Tensor, weight_dtype: torch.dtype | None = None) -> list[Tensor]:
    """``model.forward_levels(images)`` with every foldable BatchNorm fused into its convolution (see the module docstring).

    For frozen inference only: BatchNorm is taken in eval mode (running statistics) whatever
    ``model.training`` says, and no gradient flows to ``model``. Call it under the same autocast as
    the plain forward; ``weight_dtype``: the dtype that autocast gives convolution weights
    (bfloat16 under bf16 on a CPU), so that they are produced in it directly, or None (float32).
    A backbone that names no pairs runs as it is.
    """
    pairs, skeleton = _skeleton(model)
    if not pairs:
        return model.forward_levels(images)
    tensors = {name: t for name, t in (*model.named_parameters(), *model.named_buffers())}
    for conv_name, bn_name in pairs:
        for key in [k for k in tensors if k.startswith(f"{bn_name}.")]:
            del tensors[key]
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        tensors[f"{conv_name}.weight"], tensors[f"{conv_name}.bias"] = fused_conv(conv, bn, weight_dtype)
    with torch.no_grad():
        return functional_call(skeleton, {f"net.{k}": v for k, v in tensors.items()}, (images,))
