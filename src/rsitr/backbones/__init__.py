"""Image backbones behind one interface, and loading of pretrained weights into them.

``create_backbone(name, weights, seed)`` builds a registered backbone. Without weights its random
init is drawn from a private generator seeded with ``seed``, so a run without pretrained weights
is reproducible and does not disturb the global RNG. With weights, the file is loaded by
:func:`load_backbone_weights`, which checks every key and shape and names offenders in a one-line
:class:`~rsitr.errors.CheckpointError`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from rsitr.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneInfo,
    backbone_info,
    list_backbones,
    register_backbone,
)
from rsitr.backbones.resnet import LEVEL_NAMES, LEVEL_STRIDES, ResNet, resnet18, resnet50
from rsitr.errors import CheckpointError

#: Top-level keys under which training scripts commonly nest the actual state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")
#: Key prefixes added by DataParallel/DDP (``module.``) and by detector/retrieval wrappers.
_PREFIXES = ("module.", "backbone.", "model.")


def create_backbone(name: str, weights: str | Path | None = None, seed: int = 0) -> Backbone:
    """Build backbone ``name``; load ``weights`` if given, else a seeded random init.

    The random init runs under :func:`torch.random.fork_rng`, so it is a function of ``seed`` only
    and leaves the caller's RNG state untouched. The model is returned in training mode, as
    ``torch.nn`` modules are; feature extraction puts it in eval mode.
    """
    info = backbone_info(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = info.factory()
    if weights is not None:
        load_backbone_weights(model, weights)
    return model


def _read_state_dict(path: Path) -> object:
    """Read a ``.safetensors`` or a torch pickle (``weights_only``) file; CheckpointError if unreadable."""
    if not path.is_file():
        raise CheckpointError(path, "backbone weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            # weights_only refused an object (not a damaged file): say so, not torch's paragraph of advice
            raise CheckpointError(path, "cannot read backbone weights: the file holds pickled objects besides tensors, "
                                        "refused without running them (torch.load weights_only); save a plain state dict") from exc
        detail = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise CheckpointError(path, f"cannot read backbone weights ({exc.__class__.__name__}: {detail})") from exc


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Descend through wrapper keys (``state_dict``, ``model``) and strip ``module.``/``backbone.``."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, "file does not hold a state dict")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(path, f"state dict entry {key!r} is not a tensor")
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        state[name] = value
    return state


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_weights(model: Backbone, path: str | Path) -> None:
    """Load a pretrained state dict into ``model``, strictly except for the classifier.

    Accepted: ``.safetensors`` files, and ``.pth``/``.pt`` (any other suffix too) read with
    ``torch.load(weights_only=True)``; state dicts nested under ``"state_dict"``/``"model"`` keys;
    keys prefixed by ``module.``/``backbone.``. The classifier (``model.head_prefixes``, ``fc.*`` for
    a ResNet) is ignored (the head is not used for
    features and pretrained heads have other class counts). ``num_batches_tracked`` buffers may
    be absent (checkpoints from old PyTorch lack them; they do not affect eval outputs).

    Raises:
        CheckpointError: unreadable file, or missing, unexpected or shape-mismatched keys (a few
            named in the one-line message).
    """
    path = Path(path)
    state = _unwrap(_read_state_dict(path), path)
    heads = tuple(model.head_prefixes)
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(heads)}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_few(mismatched)}")
    if problems:
        name = getattr(model, "name", model.__class__.__name__)
        raise CheckpointError(path, f"does not fit backbone {name!r}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LEVEL_NAMES",
    "LEVEL_STRIDES",
    "Backbone",
    "BackboneInfo",
    "ResNet",
    "backbone_info",
    "create_backbone",
    "list_backbones",
    "load_backbone_weights",
    "register_backbone",
    "resnet18",
    "resnet50",
]
