"""Data-parallel runs over several processes (``torchrun``): who is who, shares of the work, gathering.

``torchrun --nproc-per-node N -m rsitr_cli train ...`` starts N copies of the command with the
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and rendezvous variables set; :func:`setup` reads them,
joins the process group (NCCL on GPUs, gloo on the CPU: :func:`rsitr.devices.distributed_backend`)
and gives each process its device (``cuda:LOCAL_RANK`` on a GPU node). Without those variables
everything here is the single-process case (rank 0 of 1) and costs nothing, so the library's
code paths are the same in both.

What the helpers are for:

* **Shares**: :func:`shard_range` splits ``range(n)`` into contiguous near-equal parts, one per
  rank, in rank order, so concatenating the parts in rank order gives back ``range(n)``: feature
  extraction shards the images this way, training each global batch.
* **Gathering with gradients**: :func:`gather_encoding` joins the encodings every rank computed
  for its share into the encodings of the whole batch, through
  :func:`torch.distributed.nn.functional.all_gather` (whose backward sends every rank the
  gradient of its own rows, summed over the ranks), as open_clip gathers its contrastive
  features. A ranking loss then sees every negative of the global batch, as in one process.
* **Rank 0 writes**: :func:`is_main` guards checkpoints, metrics and caches; :func:`barrier` lets
  the others wait for what rank 0 wrote.
"""

from __future__ import annotations

import datetime
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rsitr.devices import distributed_backend, parse_device, resolve_device
from rsitr.errors import ConfigError

#: How long a process waits for the others at a collective before the run fails (feature
#: extraction on rank 0 of a large dataset, or a slow validation, must fit in it).
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place in the run: its rank, the number of processes, its rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.size > 1

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files (rank 0)."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError as exc:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from exc


def env_world() -> World:
    """The :class:`World` that ``torchrun`` describes in the environment (rank 0 of 1 without it)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of the run")
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", 0))


def world() -> World:
    """This process's :class:`World`: from the joined process group, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return World()


def is_main() -> bool:
    """Whether this process is rank 0 (always, outside a distributed run)."""
    return world().main


def local_device(name: str | torch.device | None, local_rank: int) -> torch.device:
    """The device of one process of a distributed run: ``name`` resolved, where ``cuda`` (or auto on
    a GPU node) means ``cuda:LOCAL_RANK``, one GPU per process; an explicit ``cuda:N`` is kept."""
    parsed = name if isinstance(name, torch.device) else parse_device(name)
    generic = parsed is None or (not isinstance(name, torch.device) and str(name).strip().lower() == "cuda")
    if parsed is None:
        parsed = resolve_device(None)
    if generic and parsed.type == "cuda":
        parsed = torch.device("cuda", local_rank)
    return resolve_device(parsed)


def setup(device: str | torch.device | None = None) -> tuple[World, torch.device]:
    """Join the process group ``torchrun`` describes (if any, once) and resolve this process's device.

    Returns this process's :class:`World` and device. A single process (no ``WORLD_SIZE`` > 1)
    joins nothing.
    """
    env = env_world()
    chosen = process_device(device)
    if env.distributed and not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        backend = distributed_backend(chosen)
        dist.init_process_group(backend=backend, timeout=TIMEOUT,
                                device_id=chosen if chosen.type == "cuda" else None)
    return world(), chosen


def barrier() -> None:
    """Wait for every process (nothing outside a distributed run)."""
    if world().distributed:
        dist.barrier()


def shard_range(n: int, rank: int, size: int) -> range:
    """Rank ``rank``'s contiguous part of ``range(n)`` split into ``size`` near-equal parts (the first ones one longer).

    The parts in rank order concatenate to ``range(n)``; a part is empty when ``n < size``.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of {size} processes")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_sizes(n: int, size: int) -> list[int]:
    """The length of every rank's part of ``range(n)`` (:func:`shard_range`)."""
    return [len(shard_range(n, rank, size)) for rank in range(size)]


def _pad_to(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``tensor`` zero-padded at the end of every dimension to ``shape`` (False for bool)."""
    if tuple(tensor.shape) == tuple(shape):
        return tensor
    out = tensor.new_zeros(tuple(shape))
    out[tuple(slice(0, s) for s in tensor.shape)] = tensor
    return out


def _common_shapes(tensors: dict[str, torch.Tensor], rows: int, device: torch.device) -> dict[str, tuple[int, ...]]:
    """Per key, the largest size of every dimension over the ranks, with ``rows`` rows.

    Word-level encodings are as wide as the longest caption of a rank's share, which differs
    between ranks; all_gather needs one shape. One all_reduce (MAX) of all the sizes agrees on it.
    """
    keys = sorted(tensors)
    dims = [list(tensors[k].shape[1:]) for k in keys]
    flat = torch.tensor([d for sizes in dims for d in sizes] or [0], dtype=torch.long, device=device)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    values = flat.tolist()
    shapes, at = {}, 0
    for key, sizes in zip(keys, dims):
        shapes[key] = (rows, *values[at: at + len(sizes)])
        at += len(sizes)
    return shapes


def gather_rows(tensor: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every rank's first ``counts[rank]`` rows of ``tensor``, concatenated in rank order.

    ``tensor`` must have the same shape on every rank (pad it first). Floating tensors are gathered
    with their gradients (:func:`torch.distributed.nn.functional.all_gather`); others (masks,
    lengths) without, bool as uint8 since not every backend gathers bool.
    """
    if tensor.is_floating_point():
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # deprecated in favour of a private API; it is the documented gather with gradients
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(all_gather(tensor))
    else:
        payload = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        parts = [torch.empty_like(payload) for _ in counts]
        dist.all_gather(parts, payload.contiguous())
        parts = [p.to(tensor.dtype) for p in parts]
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def gather_encoding(encoding: dict[str, torch.Tensor], counts: Sequence[int]) -> dict[str, torch.Tensor]:
    """The encoding of the global batch from every rank's encoding of its share (rank order).

    Args:
        encoding: this rank's encodings; its first ``counts[rank]`` rows are real (a rank whose
            share is empty encodes one stand-in row, dropped here).
        counts: the real rows of every rank.

    Every key is zero-padded to the largest size over the ranks in each dimension before the
    gather, as :func:`rsitr.models.base.concat_encodings` pads the word dimension, so models read
    caption lengths from their ``lengths`` entries, never from widths. Outside a distributed run
    the encoding is returned as it is.
    """
    if not world().distributed:
        return encoding
    rows = max(counts)
    device = next(iter(encoding.values())).device
    shapes = _common_shapes(encoding, rows, device)
    return {key: gather_rows(_pad_to(value, shapes[key]), counts) for key, value in encoding.items()}


def broadcast_tensors(tensors: dict[str, torch.Tensor], source: int = 0) -> dict[str, torch.Tensor]:
    """``tensors`` of rank ``source`` on every rank (in place; same keys, shapes and dtypes everywhere)."""
    if world().distributed:
        for key in sorted(tensors):
            dist.broadcast(tensors[key], src=source)
    return tensors


def process_device(name: str | torch.device | None = None) -> torch.device:
    """This process's device: :func:`local_device` in a distributed run (``cuda`` = ``cuda:LOCAL_RANK``), else ``name`` resolved."""
    env = env_world()
    return local_device(name, env.local_rank) if env.distributed else resolve_device(name)


def all_agree(flag: bool) -> bool:
    """Whether ``flag`` is true on every process (``flag`` itself outside a distributed run).

    Used where processes must take the same branch, e.g. reading a cache that one node may lack.
    """
    me = world()
    if not me.distributed:
        return flag
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    vote = torch.tensor([1 if flag else 0], dtype=torch.long, device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    return bool(vote.item())
