"""The one place that knows about devices: which one to use, whether it is there, how it autocasts.

Every stage that runs tensors (feature extraction, training, pretraining, evaluation) takes a
device name, resolved here:

* ``None``, ``""`` or ``"auto"``: the best available device — the first CUDA GPU, else Apple's
  ``mps``, else the CPU (under ``torchrun`` the trainer picks ``cuda:LOCAL_RANK`` instead of the
  first GPU, :func:`rsitr.distributed.local_device`);
* ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``: that device, or a one-line
  :class:`~rsitr.errors.ConfigError` naming it when this machine does not have it.

Reduced precision (``precision="bf16"``, :mod:`rsitr.precision`) follows the device: bfloat16 on
the CPU; on CUDA bfloat16 where the GPU supports it (Ampere and later), else float16; float16 on
``mps``. Choice: the precision *name* stays ``"bf16"`` (it is a run setting and must not change
when the same run is resumed on another machine); what it means on a device is decided here, so a
pre-Ampere GPU still gets the speed of its half-precision units rather than an error.
"""

from __future__ import annotations

import re

import torch

from rsitr.errors import ConfigError

#: The device names accepted besides ``cuda:N`` (and ``auto``).
DEVICE_KINDS = ("cpu", "cuda", "mps")

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def best_device() -> torch.device:
    """The first CUDA GPU, else ``mps``, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def parse_device(name: str | None) -> torch.device | None:
    """``name`` as a :class:`torch.device` (None for the best available); ConfigError for a malformed name.

    The check is by spelling only; :func:`resolve_device` also checks that the device exists.
    """
    if name is None or str(name).strip().lower() in ("", "auto"):
        return None
    text = str(name).strip().lower()
    if text in DEVICE_KINDS:
        return torch.device(text, 0) if text == "cuda" else torch.device(text)
    match = _CUDA_INDEX.fullmatch(text)
    if match:
        return torch.device("cuda", int(match.group(1)))
    raise ConfigError(f"device {name!r} is not a device name: use auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``name`` checked for existence, or the best available for None/``auto``.

    Raises:
        ConfigError: a malformed name, or a device this machine lacks (one line naming it and
            what there is).
    """
    if isinstance(name, torch.device):
        device: torch.device | None = name
    else:
        device = parse_device(name)
    if device is None:
        return best_device()
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            there = f"{count} CUDA device(s): cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise ConfigError(f"device {str(name)!r} is not available: this machine has {there}")
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device {str(name)!r} is not available: this machine has no Apple MPS device")
    if device.type not in DEVICE_KINDS:
        raise ConfigError(f"device {str(name)!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def reduced_dtype(device: torch.device | str) -> torch.dtype:
    """The autocast dtype of ``precision="bf16"`` on ``device`` (see the module docstring)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16


def needs_grad_scaling(device: torch.device | str, precision: str) -> bool:
    """Whether training under ``precision`` on ``device`` needs loss scaling (float16 autocast).

    float16 has a narrow exponent range, so small gradients underflow to zero without a
    :class:`torch.amp.GradScaler`; bfloat16 has float32's range and needs none.
    """
    return precision == "bf16" and reduced_dtype(device) == torch.float16


def distributed_backend(device: torch.device | str) -> str:
    """The :mod:`torch.distributed` backend for ``device``: NCCL on CUDA, gloo elsewhere."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` lives: the device of its first parameter or buffer (the CPU when it has none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(tensors: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Every tensor of a batch (features, an encoding) on ``device``; tensors already there are kept as they are."""
    return {key: value.to(device) for key, value in tensors.items()}
