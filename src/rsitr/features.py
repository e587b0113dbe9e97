"""Frozen-backbone image features and their on-disk cache.

DOVE (Sec. III-A) keeps its ResNet-50 frozen, so every image's features are computed once and
cached. Per image this module stores:

* ``level1`` .. ``level4``: the global-average-pooled outputs of ResNet ``layer1`` .. ``layer4``,
  float32 (n, C_l): the N_m = 4 multiscale features M_v that Eq. 1 refines into F_M.
* ``regions``: RoIAlign (:func:`rsitr.roi.roi_align`) of the ``region_level`` map over N_r boxes,
  averaged over the output bins, float16 (n, N_r, C_region), zero for padding boxes: the region
  features R_v that Eq. 2 projects into F_R. float16 halves the cache on disk;
  :meth:`ImageFeatures.select` returns float32.
* ``region_mask``: bool (n, N_r), False for padding boxes (an image with fewer detections).
* ``region_boxes``: float32 (n, N_r, 4), the boxes in resized-image pixels.
* ``map_<level>`` (only for the levels a model asks for in ``FeatureSpec.maps``): the spatial
  output of that backbone level, adaptive-average-pooled to ``size × size``, float16
  (n, C, size, size). AMFMN's multiscale maps, DSAN's 8 × 8 Inception grid and ACF's 7 × 7 ViG
  node graph are all such maps. ``num_regions=0`` skips the region features when a model has no
  use for them (their tensors then have zero width).

:func:`backbone_features` is the computation itself; the cache runs it without gradients and
end-to-end training (:mod:`rsitr.training`) runs it with them, so both see the same features.

The cache file ``{dataset}-{backbone}-{key[:16]}.safetensors`` is keyed by a digest of everything
that changes the features (:meth:`FeatureSpec.cache_key`), and its metadata repeats the key and
the image list; a file whose metadata does not match is recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

from rsitr.backbones import Backbone, backbone_info, create_backbone
from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import load_image, normalize
from rsitr.detections import Detections, lookup, read_detections, select_boxes
from rsitr.errors import CheckpointError, ConfigError
from rsitr.evaluation import autocast
from rsitr.io import save_tensors
from rsitr.roi import roi_align

logger = logging.getLogger(__name__)

FEATURES_FORMAT = "rsitr-features-v2"
PRECISIONS = ("fp32", "bf16")
LEVEL_KEYS = ("level1", "level2", "level3", "level4")
TENSOR_KEYS = (*LEVEL_KEYS, "regions", "region_mask", "region_boxes")
MAP_PREFIX = "map_"
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines the cached features.

    Attributes:
        backbone: registered backbone name (see :func:`rsitr.backbones.list_backbones`).
        weights: pretrained weights file, or None for a random init seeded by ``seed``.
        image_size: side of the square the images are resized to (DOVE: 256).
        region_level: the map RoIAlign pools regions from, ``"layer1"`` .. ``"layer4"``.
        num_regions: N_r, boxes per image (DOVE: 36).
        roi_output_size: RoIAlign bins per side (averaged into one vector per region).
        detections: detections file (:mod:`rsitr.detections`), or None for the default boxes.
        precision: ``"fp32"``, or ``"bf16"`` (CPU autocast to bfloat16, about 2x faster on CPUs
            with bf16 instructions; both run the backbone in channels_last layout).
        seed: seed of the random init when ``weights`` is None.
        maps: spatial maps to keep, ``"level:size"`` entries (e.g. ``"layer4:8"``), each stored as
            ``map_<level>`` pooled to size × size.
    """

    backbone: str = "resnet50"
    weights: Path | None = None
    image_size: int = 256
    region_level: str = "layer3"
    num_regions: int = 36
    roi_output_size: int = 2
    detections: Path | None = None
    precision: str = "fp32"
    seed: int = 0
    maps: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("weights", "detections"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        info = backbone_info(self.backbone)
        if self.region_level not in info.level_names:
            raise ConfigError(f"region_level {self.region_level!r} is not one of {', '.join(info.level_names)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        object.__setattr__(self, "maps", tuple(str(m) for m in (self.maps or ())))
        parse_maps(self.maps, self.backbone)  # raises ConfigError on a bad entry
        for name, minimum in (("image_size", 32), ("num_regions", 0), ("roi_output_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfigError(f"feature {name} must be an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (paths as strings)."""
        out = asdict(self)
        out["maps"] = list(self.maps)
        for name in ("weights", "detections"):
            out[name] = None if out[name] is None else str(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def cache_key(self, dataset: RetrievalDataset) -> str:
        """SHA-256 hex digest of everything that changes the features of ``dataset``.

        Files enter by content, not path: moving a weights file keeps its cache valid, and
        editing it in place invalidates it.
        """
        weights = f"sha256:{file_sha256(self.weights)}" if self.weights else f"random-init-seed{self.seed}"
        detections = f"sha256:{file_sha256(self.detections)}" if self.detections else "default-boxes"
        parts = {
            "format": FEATURES_FORMAT,
            "backbone": self.backbone,
            "weights": weights,
            "image_size": self.image_size,
            "region_level": self.region_level,
            "num_regions": self.num_regions,
            "roi_output_size": self.roi_output_size,
            "detections": detections,
            "precision": self.precision,
            "maps": list(self.maps),
            "image_files": list(dataset.image_files),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()

    def cache_path(self, dataset: RetrievalDataset, cache_dir: str | Path, key: str | None = None) -> Path:
        """``cache_dir/{dataset.name}-{backbone}-{key[:16]}.safetensors``."""
        key = key or self.cache_key(dataset)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset.name) or "dataset"
        return Path(cache_dir) / f"{name}-{self.backbone}-{key[:16]}.safetensors"


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's content, memoised per (path, size, mtime) within the process.

    Raises:
        CheckpointError: the file does not exist or cannot be read.
    """
    path = Path(path)
    try:
        stat = path.stat()
        memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if memo not in _HASHES:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            _HASHES[memo] = digest.hexdigest()
        return _HASHES[memo]
    except OSError as exc:
        raise CheckpointError(path, f"cannot read file to hash it ({exc.__class__.__name__})") from exc


def parse_maps(maps: Sequence[str], backbone: str) -> list[tuple[str, int]]:
    """``["layer4:8"]`` → ``[("layer4", 8)]``, checking each level exists in ``backbone``.

    Raises:
        ConfigError: a malformed entry, an unknown level, a size below 1, or a level given twice.
    """
    info = backbone_info(backbone)
    parsed: list[tuple[str, int]] = []
    for entry in maps:
        level, sep, size = str(entry).partition(":")
        if not sep or not size.strip().isdigit() or int(size) < 1:
            raise ConfigError(f"feature map {entry!r} must look like 'level:size' with size >= 1, e.g. 'layer4:8'")
        if level not in info.level_names:
            raise ConfigError(f"feature map {entry!r}: {backbone} has no level {level!r} (levels: {', '.join(info.level_names)})")
        if level in [name for name, _ in parsed]:
            raise ConfigError(f"feature map level {level!r} is listed twice")
        parsed.append((level, int(size)))
    return parsed


def feature_dims(spec: FeatureSpec) -> dict[str, object]:
    """Feature sizes for ``spec`` without building the backbone (models need them to build).

    Returns:
        ``{"level_channels": (C_1, .., C_4), "region_channels": C_region, "num_levels": 4,
        "num_regions": N_r, "maps": {level: (C, size)}}``.
    """
    info = backbone_info(spec.backbone)
    return {
        "level_channels": tuple(info.level_channels),
        "region_channels": info.level_channels[info.level_names.index(spec.region_level)],
        "num_levels": len(info.level_channels),
        "num_regions": spec.num_regions,
        "maps": {level: (info.level_channels[info.level_names.index(level)], size)
                 for level, size in parse_maps(spec.maps, spec.backbone)},
    }


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


# ----------------------------------------------------------------------------------------------
# Extraction


@dataclass
class _Batch:
    images: Tensor  # (B, 3, S, S), ImageNet-normalised
    boxes: Tensor  # (B, N_r, 4) resized pixels
    mask: Tensor  # (B, N_r) bool


def _load_batch(dataset: RetrievalDataset, ids: range, spec: FeatureSpec, detections: Detections | None) -> _Batch:
    """Decode and resize images ``ids`` and choose their boxes (runs in the loader thread)."""
    images, boxes, masks = [], [], []
    for i in ids:
        image, original_size = load_image(dataset.image_path(i), spec.image_size)
        entry = lookup(detections, dataset.image_files[i]) if detections is not None else None
        b, m = select_boxes(entry[0] if entry else None, entry[1] if entry else None, original_size,
                            spec.image_size, spec.num_regions)
        images.append(image)
        boxes.append(b)
        masks.append(m)
    return _Batch(normalize(torch.stack(images)), torch.stack(boxes), torch.stack(masks))


def _prefetched(dataset: RetrievalDataset, spec: FeatureSpec, detections: Detections | None,
                batch_size: int) -> Iterator[tuple[range, _Batch]]:
    """Batches in order, the next one decoding in a thread while the caller computes this one.

    PIL releases the GIL while decoding and resizing, so one loader thread overlaps image I/O
    with the backbone without the start-up cost of worker processes.
    """
    n = dataset.num_images
    ranges = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsitr-images") as pool:
        pending: list[Future[_Batch]] = [pool.submit(_load_batch, dataset, r, spec, detections) for r in ranges[:2]]
        for i, r in enumerate(ranges):
            batch = pending.pop(0).result()
            if i + 2 < len(ranges):
                pending.append(pool.submit(_load_batch, dataset, ranges[i + 2], spec, detections))
            yield r, batch


def backbone_features(model: Backbone, images: Tensor, boxes: Tensor, mask: Tensor, spec: FeatureSpec,
                      precision: str | None = None) -> dict[str, Tensor]:
    """The features of a batch of images, as :meth:`ImageFeatures.select` returns cached ones.

    This is the one feature computation: the cache runs it under :func:`torch.inference_mode`
    with a frozen backbone, and end-to-end training runs it with gradients, so a trained
    backbone's features are by construction what the cache would hold for it.

    Args:
        model: the backbone (its mode and ``requires_grad`` are the caller's business).
        images: (B, 3, S, S) ImageNet-normalised float images.
        boxes: (B, N_r, 4) region boxes in image pixels (as :func:`rsitr.detections.select_boxes` gives).
        mask: (B, N_r) bool, False for padding boxes (their features are zero).
        spec: which levels, maps and regions to compute.
        precision: ``"fp32"`` or ``"bf16"`` (CPU autocast of the backbone only); None = ``spec.precision``.

    Returns:
        float32 ``level1`` .. ``level4`` (B, C_l), ``map_<level>`` (B, C, s, s) for ``spec.maps``,
        ``regions`` (B, N_r, C_region) (zero width when ``num_regions`` is 0), and ``region_mask``
        and ``region_boxes`` as given.
    """
    images = images.contiguous(memory_format=torch.channels_last)
    with autocast(precision or spec.precision):
        levels = model.forward_levels(images)
    levels = [lvl.float() for lvl in levels]
    out = {key: lvl.mean(dim=(2, 3)) for key, lvl in zip(LEVEL_KEYS, levels)}
    names = backbone_info(spec.backbone).level_names
    for level, size in parse_maps(spec.maps, spec.backbone):
        out[f"{MAP_PREFIX}{level}"] = F.adaptive_avg_pool2d(levels[names.index(level)], size)
    level_index = names.index(spec.region_level)
    if spec.num_regions == 0:
        out["regions"] = levels[level_index].new_zeros(images.shape[0], 0, levels[level_index].shape[1])
    else:
        scale = 1.0 / model.level_strides[level_index]
        pooled = roi_align(levels[level_index], boxes, scale, spec.roi_output_size, sampling_ratio=2)
        # Padding boxes (mask False) get zero features rather than whatever a zero box samples.
        out["regions"] = pooled.mean(dim=(3, 4)) * mask.unsqueeze(-1).to(torch.float32)
    out["region_mask"], out["region_boxes"] = mask, boxes
    return out


def _allocate(n: int, spec: FeatureSpec) -> dict[str, Tensor]:
    dims = feature_dims(spec)
    out = {key: torch.zeros(n, c, dtype=torch.float32) for key, c in zip(LEVEL_KEYS, dims["level_channels"])}
    out["regions"] = torch.zeros(n, spec.num_regions, dims["region_channels"], dtype=torch.float16)
    out["region_mask"] = torch.zeros(n, spec.num_regions, dtype=torch.bool)
    out["region_boxes"] = torch.zeros(n, spec.num_regions, 4, dtype=torch.float32)
    for level, (channels, size) in dims["maps"].items():
        out[f"{MAP_PREFIX}{level}"] = torch.zeros(n, channels, size, size, dtype=torch.float16)
    return out


def compute_features(dataset: RetrievalDataset, spec: FeatureSpec, batch_size: int = 32,
                     progress: bool = True) -> ImageFeatures:
    """Run the frozen backbone over every image of ``dataset`` (all splits, dataset order).

    No cache is read or written; see :func:`extract_features`. Logs the throughput (images/s).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    detections = read_detections(spec.detections) if spec.detections is not None else None
    model = create_backbone(spec.backbone, spec.weights, spec.seed).eval().requires_grad_(False)
    # channels_last lets oneDNN pick its fast convolution kernels: about 2x on CPU in fp32 and
    # needed for the bf16 speed-up; it changes the memory layout only, not the result.
    model = model.to(memory_format=torch.channels_last)
    n = dataset.num_images
    out = _allocate(n, spec)
    start = time.perf_counter()
    bar = tqdm(total=n, desc="features", unit="img", disable=not progress)
    with torch.inference_mode(), bar:
        for rows, batch in _prefetched(dataset, spec, detections, batch_size):
            result = backbone_features(model, batch.images, batch.boxes, batch.mask, spec)
            sl = slice(rows.start, rows.stop)
            for key in LEVEL_KEYS:
                out[key][sl] = result[key]
            for key in out:
                if key.startswith(MAP_PREFIX) or (key == "regions" and spec.num_regions):
                    out[key][sl] = result[key].clamp(-_FP16_MAX, _FP16_MAX).half()
            out["region_mask"][sl] = batch.mask
            out["region_boxes"][sl] = batch.boxes
            bar.update(len(rows))
    seconds = time.perf_counter() - start
    logger.info("features: %d images in %.1f s (%.1f images/s, %s %s)", n, seconds,
                n / seconds if seconds > 0 else float("nan"), spec.backbone, spec.precision)
    return _from_tensors(out, list(dataset.image_files), spec, "")


def extract_features(dataset: RetrievalDataset, spec: FeatureSpec, cache_dir: str | Path | None,
                     batch_size: int = 32, progress: bool = True) -> ImageFeatures:
    """Features of every image of ``dataset``, from the cache when it is valid, else computed.

    The cache file (:meth:`FeatureSpec.cache_path`) is reused only if its stored key and image
    list equal this dataset's; otherwise (or if unreadable) the features are recomputed and the
    file is replaced atomically. ``cache_dir=None`` computes without caching.
    """
    key = spec.cache_key(dataset)
    path = spec.cache_path(dataset, cache_dir, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        cached = _load_cached(path, key, dataset)
        if cached is not None:
            cached.spec = spec  # same key, so equivalent; keep the caller's paths
            logger.info("features: loaded %d images from cache %s", cached.num_images, path.name)
            return cached
    features = compute_features(dataset, spec, batch_size=batch_size, progress=progress)
    features.cache_key = key
    if path is not None:
        save_features(path, features)
    return features


__all__ = [
    "FEATURES_FORMAT",
    "LEVEL_KEYS",
    "PRECISIONS",
    "TENSOR_KEYS",
    "FeatureSpec",
    "ImageFeatures",
    "backbone_features",
    "compute_features",
    "extract_features",
    "feature_dims",
    "file_sha256",
    "load_features",
    "parse_maps",
    "save_features",
]
