"""The one definition of numeric precision: which values exist and how each one runs.

Every stage that can run in reduced precision (feature extraction, model encoding and scoring,
training, pretraining) accepts the same two names:

* ``"fp32"``: plain float32;
* ``"bf16"``: CPU bfloat16 autocast. Matrix products and convolutions run in bfloat16 (about
  twice as fast on CPUs with bf16 instructions); weights, gradients and optimiser state stay
  float32, and scores are finished in float32 by the models (``rsitr.models.layers.full_precision``).
"""

from __future__ import annotations

import contextlib

import torch

from rsitr.errors import ConfigError

#: The accepted precision names.
PRECISIONS = ("fp32", "bf16")


def check_precision(value: object, name: str = "precision") -> str:
    """``value`` if it names a precision, else a one-line ConfigError naming the setting."""
    if value not in PRECISIONS:
        raise ConfigError(f"{name} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return str(value)


def autocast(precision: str) -> contextlib.AbstractContextManager[object]:
    """CPU bfloat16 autocast for ``"bf16"``, nothing for ``"fp32"``; ConfigError for anything else."""
    check_precision(precision)
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
