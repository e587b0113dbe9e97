"""Encoding shards: safetensors files of per-tile encodings, read back row by row without loading them.

An index stores the encodings of its tiles in shards of up to ``shard_size`` rows each
(``shards/shard-000001.safetensors``...). Every tensor of a shard has one row per tile, in the order
the tile database records (``tiles.shard``, ``tiles.row``). Floating-point encodings are stored in
float16 (clamped to its range): a DOVE tile's three 512-d vectors then take 3 KiB, and the rounding
is far below what moves a ranking (the two-stage benchmark measures ranks with it).

Re-ranking a query reads a few hundred rows scattered over many shards. Loading whole shards for
that would read the index again per query, so :class:`ShardReader` maps each shard's tensors as
numpy memory maps (the safetensors layout is an 8-byte header length, a JSON header giving each
tensor's dtype, shape and byte offsets, then the raw little-endian data) and gathers rows by fancy
indexing: the operating system pages in only the rows a query touches.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rsitr.errors import DatasetError
from rsitr.features.compute import to_float16
from rsitr.io import save_tensors

_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BOOL": np.bool_, "I64": np.int64,
                 "I32": np.int32, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "BF16": None}
#: Prefix of the model's encodings in a shard; ``stage.`` holds a separate first-stage model's image side.
ENCODING_PREFIX = "enc."
STAGE_PREFIX = "stage."


def shard_name(shard_id: int) -> str:
    """File name of shard ``shard_id`` (ids start at 1)."""
    return f"shard-{shard_id:06d}.safetensors"


def as_storable(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as a shard holds it: floating point as float16 (clamped), anything else unchanged."""
    return to_float16(tensor) if tensor.is_floating_point() else tensor


def write_shard(path: Path, tensors: dict[str, torch.Tensor], tile_ids: list[int]) -> int:
    """Write one shard atomically; returns its size in bytes.

    ``tensors`` must all have ``len(tile_ids)`` rows; the ids are recorded in the metadata so a
    shard can be checked against the database.
    """
    rows = {t.shape[0] for t in tensors.values()}
    if rows != {len(tile_ids)}:
        raise ValueError(f"shard tensors have {sorted(rows)} rows for {len(tile_ids)} tiles")
    save_tensors(path, {key: as_storable(value) for key, value in tensors.items()},
                 metadata={"first_tile": str(tile_ids[0]) if tile_ids else "0", "rows": str(len(tile_ids))})
    return path.stat().st_size


def _memory_maps(path: Path) -> dict[str, np.ndarray]:
    """Memory maps of every tensor of a safetensors file, by name."""
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"not a readable encoding shard ({exc.__class__.__name__})") from exc
    start = 8 + header_size
    size = path.stat().st_size
    maps = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _NUMPY_DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        if dtype is None or start + end > size:
            raise DatasetError(path, f"encoding shard is truncated or holds an unreadable tensor {name!r}")
        shape = tuple(entry["shape"])
        if end == begin:
            maps[name] = np.zeros(shape, dtype=dtype)
        else:
            maps[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return maps


class ShardReader:
    """Rows of the shards of one index folder, gathered by (shard, row) without loading whole shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    def tensors(self, shard_id: int) -> dict[str, np.ndarray]:
        """The memory maps of shard ``shard_id`` (opened once)."""
        if shard_id not in self._maps:
            path = self.folder / shard_name(shard_id)
            if not path.is_file():
                raise DatasetError(path, "encoding shard missing: the index is damaged (rebuild it)")
            self._maps[shard_id] = _memory_maps(path)
        return self._maps[shard_id]

    def gather(self, shards: np.ndarray, rows: np.ndarray, prefix: str,
               keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows ``rows[i]`` of shards ``shards[i]`` of every tensor named ``prefix*``, in that order.

        ``keys`` (without the prefix) limits the tensors read. Keys are returned without the
        prefix; floating tensors come back as float32.
        """
        wanted = None if keys is None else {f"{prefix}{key}" for key in keys}
        shards = np.asarray(shards, dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(shards, kind="stable")
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for shard_id in np.unique(shards):
            positions = order[shards[order] == shard_id]
            for name, array in self.tensors(int(shard_id)).items():
                if name.startswith(prefix) and (wanted is None or name in wanted):
                    parts.setdefault(name[len(prefix):], []).append((positions, np.asarray(array[rows[positions]])))
        out = {}
        for key, pieces in parts.items():
            first = pieces[0][1]
            joined = np.empty((len(rows), *first.shape[1:]), dtype=first.dtype)
            for positions, values in pieces:
                joined[positions] = values
            tensor = torch.from_numpy(joined)
            out[key] = tensor.float() if tensor.is_floating_point() else tensor
        return out

    def close(self) -> None:
        """Drop the memory maps (files can then be replaced)."""
        self._maps.clear()
