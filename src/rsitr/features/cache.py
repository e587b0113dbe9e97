"""The on-disk feature cache: every image of a dataset, extracted once, stored as safetensors.

The cache file ``{dataset}-{backbone}-{key[:16]}.safetensors`` is keyed by a digest of everything
that changes the features (:meth:`FeatureSpec.cache_key`), and its metadata repeats the key and
the image list; a file whose metadata does not match is recomputed, never reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from rsitr.data.dataset import RetrievalDataset
from rsitr.distributed import all_agree, barrier, is_main, world
from rsitr.errors import CheckpointError, ConfigError
from rsitr.features.compute import compute_dataset_tensors
from rsitr.features.spec import FEATURES_FORMAT, MAP_PREFIX, TENSOR_KEYS, FeatureSpec, parse_maps
from rsitr.io import check_writable, remove_partial_writes, save_tensors
from rsitr.progress import get_logger

logger = get_logger(__name__)


def _index(image_ids: Sequence[int] | np.ndarray | Tensor) -> Tensor:
    """Row ids (list, numpy array or tensor) as a 1-D int64 tensor."""
    if isinstance(image_ids, Tensor):
        return image_ids.to(torch.long).reshape(-1)
    return torch.from_numpy(np.asarray(image_ids, dtype=np.int64).reshape(-1))


@dataclass
class ImageFeatures:
    """Cached features of every image of a dataset, rows in dataset image order.

    Attributes:
        level1, level2, level3, level4: float32 (n, C_l), pooled ResNet stage outputs (M_v).
        regions: float16 (n, N_r, C_region), RoIAlign region features (R_v).
        region_mask: bool (n, N_r), True for real boxes, False for padding.
        region_boxes: float32 (n, N_r, 4), boxes in resized-image pixels.
        maps: float16 (n, C, s, s) spatial maps by key ``map_<level>`` (empty unless the spec asks).
        image_files: the dataset's image filenames, one per row.
        spec: the spec the features were extracted with.
        cache_key: :meth:`FeatureSpec.cache_key` of the source dataset ("" for a subset).
    """

    level1: Tensor
    level2: Tensor
    level3: Tensor
    level4: Tensor
    regions: Tensor
    region_mask: Tensor
    region_boxes: Tensor
    image_files: list[str]
    spec: FeatureSpec
    cache_key: str = ""
    maps: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.image_files)

    @property
    def levels(self) -> list[Tensor]:
        """``[level1, level2, level3, level4]``."""
        return [self.level1, self.level2, self.level3, self.level4]

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (``TENSOR_KEYS`` and the ``map_<level>`` keys)."""
        return {**{k: getattr(self, k) for k in TENSOR_KEYS}, **self.maps}

    def select(self, image_ids: Sequence[int] | np.ndarray | Tensor) -> dict[str, Tensor]:
        """Rows of ``image_ids`` as a batch: levels, regions and maps (cast to float32), mask and boxes."""
        idx = _index(image_ids)
        batch = {k: v.index_select(0, idx) for k, v in self.tensors().items()}
        for key in ("regions", *self.maps):
            batch[key] = batch[key].float()
        return batch

    def subset(self, image_ids: Sequence[int] | np.ndarray | Tensor) -> ImageFeatures:
        """The given rows, in the given order (e.g. one split of the dataset)."""
        return _from_tensors({k: v.index_select(0, _index(image_ids)) for k, v in self.tensors().items()},
                             [self.image_files[i] for i in _index(image_ids).tolist()], self.spec, "")


def _from_tensors(tensors: dict[str, Tensor], image_files: list[str], spec: FeatureSpec, cache_key: str) -> ImageFeatures:
    maps = {k: v for k, v in tensors.items() if k.startswith(MAP_PREFIX)}
    return ImageFeatures(**{k: tensors[k] for k in TENSOR_KEYS}, image_files=image_files, spec=spec,
                         cache_key=cache_key, maps=maps)


# ----------------------------------------------------------------------------------------------
# Cache files


def save_features(path: str | Path, features: ImageFeatures) -> None:
    """Write ``features`` atomically as safetensors with spec, key and image list in metadata."""
    metadata = {
        "format": FEATURES_FORMAT,
        "cache_key": features.cache_key,
        "spec": json.dumps(features.spec.to_dict(), sort_keys=True),
        "image_files": json.dumps(features.image_files),
    }
    save_tensors(path, features.tensors(), metadata=metadata)


def load_features(path: str | Path) -> ImageFeatures:
    """Read a features file written by :func:`save_features`.

    Raises:
        CheckpointError: unreadable file, wrong format, or missing/inconsistent tensors.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(path, f"cannot read features file ({exc.__class__.__name__})") from exc
    if metadata.get("format") != FEATURES_FORMAT:
        raise CheckpointError(path, f"not an rsitr features file (format {metadata.get('format')!r})")
    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing:
        raise CheckpointError(path, f"features file lacks tensors: {', '.join(missing)}")
    try:
        spec = FeatureSpec.from_dict(json.loads(metadata["spec"]))
        image_files = list(json.loads(metadata["image_files"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(path, f"features file has invalid metadata ({exc.__class__.__name__})") from exc
    rows = {k: t.shape[0] for k, t in tensors.items()}
    if set(rows.values()) != {len(image_files)}:
        raise CheckpointError(path, f"features file rows {rows} do not match {len(image_files)} image names")
    missing_maps = [f"{MAP_PREFIX}{level}" for level, _ in parse_maps(spec.maps, spec.backbone)
                    if f"{MAP_PREFIX}{level}" not in tensors]
    if missing_maps:
        raise CheckpointError(path, f"features file lacks maps: {', '.join(missing_maps)}")
    tensors["region_mask"] = tensors["region_mask"].bool()
    return _from_tensors(tensors, image_files, spec, metadata.get("cache_key", ""))


def _load_cached(path: Path, key: str, dataset: RetrievalDataset) -> ImageFeatures | None:
    """The cache at ``path`` if it is readable and made for exactly this key and image list."""
    try:
        cached = load_features(path)
    except CheckpointError as exc:
        logger.warning("ignoring unreadable feature cache: %s", exc)
        return None
    if cached.cache_key != key or cached.image_files != list(dataset.image_files):
        logger.warning("feature cache %s was made for other images or settings; recomputing", path.name)
        return None
    return cached


def compute_features(dataset: RetrievalDataset, spec: FeatureSpec, batch_size: int = 32,
                     progress: bool = True, device: str | torch.device | None = None) -> ImageFeatures:
    """Features of every image of ``dataset`` (all splits, dataset order); no cache is read or written.

    ``device``: where the backbone runs (None = the best available); the features are CPU tensors.
    """
    tensors = compute_dataset_tensors(dataset, spec, batch_size=batch_size, progress=progress, device=device)
    return _from_tensors(tensors, list(dataset.image_files), spec, "")


def extract_features(dataset: RetrievalDataset, spec: FeatureSpec, cache_dir: str | Path | None,
                     batch_size: int = 32, progress: bool = True, device: str | torch.device | None = None) -> ImageFeatures:
    """Features of every image of ``dataset``, from the cache when it is valid, else computed.

    The cache file (:meth:`FeatureSpec.cache_path`) is reused only if its stored key and image
    list equal this dataset's; otherwise (or if unreadable) the features are recomputed and the
    file is replaced atomically. ``cache_dir=None`` computes without caching. ``device``: where
    the backbone runs (None = the best available); it is not part of the cache key.

    In a distributed run (``torchrun``) every process must call this: the cache is used only when
    every process finds it valid (one vote, so no process computes alone), the images are shared
    out among the processes (:func:`compute_dataset_tensors`), and rank 0 alone writes the file.

    Two jobs needing the same cache file at once (two trainings started together): the writer
    holds an advisory lock on ``<file>.lock`` (:func:`cache_lock`) while it computes and writes,
    so the other waits (one log line) and then reads the finished file instead of computing it
    again. Temporary files an interrupted (killed) writer left for this cache file are removed
    under the lock, where no live writer can own them.
    """
    key = spec.cache_key(dataset)
    path = spec.cache_path(dataset, cache_dir, key) if cache_dir is not None else None
    cached = _load_cached(path, key, dataset) if path is not None and path.is_file() else None
    if path is not None and all_agree(cached is not None) and cached is not None:
        return _from_cache(cached, spec, path)
    if cache_dir is not None and is_main():
        check_writable(cache_dir, "feature cache")  # before minutes of extraction; a valid cache may sit read-only
    writer = path if is_main() else None  # the process that writes the file (rank 0), None without a cache
    with cache_lock(writer) if writer is not None else contextlib.nullcontext(False) as waited:
        if waited and writer is not None and writer.is_file() and not world().distributed:
            cached = _load_cached(writer, key, dataset)  # the job waited for has just written it
            if cached is not None:
                return _from_cache(cached, spec, writer)
        if writer is not None:
            _remove_partial_writes(writer)
        features = compute_features(dataset, spec, batch_size=batch_size, progress=progress and is_main(), device=device)
        features.cache_key = key
        if writer is not None:
            save_features(writer, features)
    barrier()  # the file is there for every process once this returns
    return features


def _from_cache(cached: ImageFeatures, spec: FeatureSpec, path: Path) -> ImageFeatures:
    cached.spec = spec  # same key, so equivalent; keep the caller's paths
    logger.info("features: loaded %d images from cache %s", cached.num_images, path.name)
    return cached


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on ``<path>.lock`` for the block; yields whether it had to wait.

    The lock belongs to the open file, so the system releases it when the process ends, even by
    kill -9: a dead writer never blocks the next one. The holder removes the lock file when it is
    done (a killed one leaves it, harmless: the next writer locks and removes it); a waiter that
    then holds a file no longer at ``<path>.lock`` opens the path again, so two writers never hold
    the lock on two different files.
    """
    lock_path = path.with_name(path.name + ".lock")
    waited = False
    while True:
        try:
            handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"{lock_path}: cannot create the feature cache's lock ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                logger.info("features: another process is writing %s; waiting for it", path.name)
            waited = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:  # a file system without locks (some network mounts): atomic renames still hold
            os.close(handle)
            logger.warning("features: cannot lock %s (%s); writing without waiting for other writers",
                           lock_path.name, exc.strerror or exc)
            yield False
            return
        if _still_at(handle, lock_path):
            break
        os.close(handle)  # the holder removed the file while this one waited: lock the one at the path now
    try:
        yield waited
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(handle)  # releases the lock


def _still_at(handle: int, path: Path) -> bool:
    """Whether the open file ``handle`` is the file at ``path``."""
    try:
        mine, there = os.fstat(handle), os.stat(path)
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
    except FileNotFoundError:
        return False


def _remove_partial_writes(path: Path) -> None:
    """Delete the temporary files of ``path`` a killed writer left (under the lock no live writer owns them)."""
    stale = remove_partial_writes(path.parent, glob.escape(path.name))
    if stale:
        logger.warning("features: removed %d partial file(s) of %s left by an interrupted extraction", len(stale), path.name)

