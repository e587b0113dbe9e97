"""The one definition of numeric precision: which values exist and how each one runs.

Every stage that can run in reduced precision (feature extraction, model encoding and scoring,
training, pretraining) accepts the same two names:

* ``"fp32"``: plain float32;
* ``"bf16"``: reduced-precision autocast. Matrix products and convolutions run in bfloat16 on the
  CPU (about twice as fast on CPUs with bf16 instructions); on a GPU in the half-precision type
  the hardware has (:func:`rsitr.devices.reduced_dtype`: bfloat16, else float16). Weights,
  gradients and optimiser state stay float32, and scores are finished in float32 by the models
  (``rsitr.models.layers.full_precision``).
"""

from __future__ import annotations

import contextlib

import torch

from rsitr.devices import reduced_dtype
from rsitr.errors import ConfigError

#: The accepted precision names.
PRECISIONS = ("fp32", "bf16")


def check_precision(value: object, name: str = "precision") -> str:
    """``value`` if it names a precision, else a one-line ConfigError naming the setting."""
    if value not in PRECISIONS:
        raise ConfigError(f"{name} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return str(value)


def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[object]:
    """Autocast of ``device``'s kind for ``"bf16"`` (its dtype: :func:`rsitr.devices.reduced_dtype`),
    nothing for ``"fp32"``; ConfigError for anything else.

    ``device`` is where the tensors of the block live: autocast acts per device type, so a CPU
    autocast would leave CUDA matrix products in float32.
    """
    check_precision(precision)
    if precision != "bf16":
        return contextlib.nullcontext()
    device = torch.device(device)
    return torch.autocast(device.type, dtype=reduced_dtype(device))
