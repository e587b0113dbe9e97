"""What determines a set of image features (:class:`FeatureSpec`), and their sizes.

A spec names the backbone and its weights, the input size, the region boxes (their source:
a detections file, the fixed grid or activation proposals), the spatial maps a model asks for,
the source bands of multispectral TIFFs and whether features are averaged over rotations and flips;
:meth:`FeatureSpec.cache_key` digests everything that changes the features, so a cache file is reused only
for exactly the features it holds. :func:`feature_dims` gives the channel counts a model needs to build
itself, without building the backbone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rsitr.backbones import backbone_info
from rsitr.errors import CheckpointError, ConfigError, ImageReadError
from rsitr.features.proposals import PROPOSALS_VERSION
from rsitr.precision import check_precision

if TYPE_CHECKING:
    from rsitr.data.dataset import RetrievalDataset

FEATURES_FORMAT = "rsitr-features-v2"
LEVEL_KEYS = ("level1", "level2", "level3", "level4")
TENSOR_KEYS = (*LEVEL_KEYS, "regions", "region_mask", "region_boxes")
MAP_PREFIX = "map_"
#: Where an image's region boxes come from when the detections file has no entry for it.
BOX_SOURCES = ("grid", "activation")


def default_cache_dir() -> str:
    """``$RSITR_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/rsitr`` (``~/.cache/rsitr``)."""
    if os.environ.get("RSITR_CACHE_DIR"):
        return os.environ["RSITR_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "rsitr")


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
        detections: detections file (:mod:`rsitr.features.detections`), or None for the default boxes.
        precision: ``"fp32"``, or ``"bf16"`` (CPU autocast to bfloat16, about 2x faster on CPUs
            with bf16 instructions; both run the backbone in channels_last layout).
        seed: seed of the random init when ``weights`` is None.
        maps: spatial maps to keep, ``"level:size"`` entries (e.g. ``"layer4:8"``), each stored as
            ``map_<level>`` pooled to size × size.
        boxes: the region boxes of an image without detections: ``"grid"``, the same fixed
            multi-scale grid for every image (:func:`rsitr.features.roi.default_boxes`), or
            ``"activation"``, detector-free proposals from the backbone's own maps in the same
            forward pass (:mod:`rsitr.features.proposals`). A detections entry wins over either.
        bands: the 1-based source bands of TIFF images that become R, G, B (three numbers, e.g.
            ``(4, 3, 2)`` for a near-infrared false-colour composite, or one read as gray); None =
            the file's red, green and blue colour interpretation, else bands 1-3 (the raster
            reader's default, :mod:`rsitr.data.rasters`). See :func:`rsitr.data.images.read_image`.
        dihedral: compute every feature from the backbone's maps averaged over the eight rotations
            by 90 degrees and mirror images of the image (the dihedral group D4), each map turned
            back onto the image first (:func:`rsitr.features.compute.backbone_features`): overhead
            scenes have no preferred orientation, and the features become invariant to it, at
            eight backbone passes per image, paid once when the cache is filled.
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
    boxes: str = "grid"
    bands: tuple[int, ...] | None = None
    dihedral: bool = False

    def __post_init__(self) -> None:
        for name in ("weights", "detections"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        info = backbone_info(self.backbone)
        if self.region_level not in info.level_names:
            raise ConfigError(f"region_level {self.region_level!r} is not one of {', '.join(info.level_names)}")
        check_precision(self.precision, "feature precision")
        if self.boxes not in BOX_SOURCES:
            raise ConfigError(f"feature boxes {self.boxes!r} is not one of {', '.join(BOX_SOURCES)}")
        object.__setattr__(self, "maps", tuple(str(m) for m in (self.maps or ())))
        parse_maps(self.maps, self.backbone)  # raises ConfigError on a bad entry
        object.__setattr__(self, "bands", checked_bands(self.bands, "feature bands"))
        if not isinstance(self.dihedral, (bool, np.bool_)):
            raise ConfigError(f"feature dihedral must be true or false, got {self.dihedral!r}")
        object.__setattr__(self, "dihedral", bool(self.dihedral))
        for name, minimum in (("image_size", 32), ("num_regions", 0), ("roi_output_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfigError(f"feature {name} must be an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (paths as strings)."""
        out = asdict(self)
        out["maps"] = list(self.maps)
        out["bands"] = None if self.bands is None else list(self.bands)
        for name in ("weights", "detections"):
            out[name] = None if out[name] is None else str(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        """Inverse of :meth:`to_dict`; unknown keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def cache_key(self, dataset: RetrievalDataset) -> str:
        """SHA-256 hex digest of everything that changes the features of ``dataset``.

        Files enter by content, not path: moving a weights file keeps its cache valid, and
        editing it in place invalidates it. So do the images (:func:`images_fingerprint`): a
        dataset whose images were replaced, or another dataset with the same name and file names,
        never reads this one's features, and a missing image is a one-line error here, before any
        work. The box source enters when it is not ``"grid"``
        (with the proposals' version), so caches written before the field existed stay valid
        for the grid and never serve another source; the bands likewise, when they are given, and
        the D4 averaging, when it is on.
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
            "image_content": images_fingerprint(dataset),
        }
        if self.boxes != "grid":
            # Under bf16 the proposals are chosen from the maps of the BatchNorm-folded backbone
            # (rsitr.backbones.fold), whose rounding differs and can flip near-tied boxes: such
            # caches are keyed apart from those written before; all others differ by rounding only.
            folded = ":bn-folded" if self.precision == "bf16" else ""
            parts["boxes"] = f"{self.boxes}:{PROPOSALS_VERSION}{folded}"
        if self.bands is not None:
            parts["bands"] = list(self.bands)
        if self.dihedral:
            parts["dihedral"] = "d4-aligned-map-mean"
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()

    def cache_path(self, dataset: RetrievalDataset, cache_dir: str | Path, key: str | None = None) -> Path:
        """``cache_dir/{dataset.name}-{backbone}-{key[:16]}.safetensors``."""
        key = key or self.cache_key(dataset)
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset.name) or "dataset"
        return Path(cache_dir) / f"{name}-{self.backbone}-{key[:16]}.safetensors"


def checked_bands(value: Any, what: str) -> tuple[int, ...] | None:
    """``value`` as a tuple of one or three band numbers >= 1 (None stays None); a one-line ConfigError otherwise.

    Whether the bands exist is known only per file, when it is read (an error naming the file).
    """
    if value is None:
        return None
    items = [value] if isinstance(value, (str, bytes)) else value
    try:
        bands = tuple(items)
    except TypeError:
        bands = ()
    if len(bands) not in (1, 3) or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1
                                           for b in bands):
        raise ConfigError(f"{what} must be three 1-based band numbers for R, G, B (e.g. [4, 3, 2]) or one for gray, "
                          f"got {value!r}")
    return tuple(int(b) for b in bands)


_HASHES: dict[tuple[str, int, int], str] = {}
_SAMPLES: dict[tuple[str, int, int], str] = {}
#: Bytes read from each end of an image for its content sample; smaller files are read whole.
SAMPLE_BYTES = 16 * 1024


def content_sample(path: Path) -> str:
    """A cheap digest of a file's content: its size and SHA-256 of its first and last :data:`SAMPLE_BYTES`.

    Two image files that differ differ in their header or their coded data at both ends with
    near certainty; reading 32 KiB per image instead of all of it keeps the key of a 30,000-image
    dataset to a second or two. Memoised per (path, size, mtime) within the process.

    Raises:
        ImageReadError: the file does not exist or cannot be read.
    """
    try:
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in _SAMPLES:
            digest = hashlib.sha256(str(stat.st_size).encode())
            with path.open("rb") as handle:
                if stat.st_size <= 2 * SAMPLE_BYTES:
                    digest.update(handle.read())
                else:
                    digest.update(handle.read(SAMPLE_BYTES))
                    handle.seek(-SAMPLE_BYTES, os.SEEK_END)
                    digest.update(handle.read(SAMPLE_BYTES))
            _SAMPLES[memo] = digest.hexdigest()
        return _SAMPLES[memo]
    except FileNotFoundError as exc:
        raise ImageReadError(path, "image file not found (the feature cache is keyed by the images' content)") from exc
    except OSError as exc:
        raise ImageReadError(path, f"cannot read image file ({exc.__class__.__name__})") from exc


def images_fingerprint(dataset: RetrievalDataset) -> str:
    """SHA-256 over the :func:`content_sample` of every image of ``dataset``, in dataset order.

    Content, not paths or times: a dataset copied or moved with its images keeps its cache; one
    whose images were replaced gets a new key.
    """
    digest = hashlib.sha256()
    for index in range(dataset.num_images):
        digest.update(content_sample(dataset.image_path(index)).encode())
    return digest.hexdigest()


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


def feature_dims(spec: FeatureSpec) -> dict[str, Any]:
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

