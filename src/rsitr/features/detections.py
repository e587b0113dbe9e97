"""Detected salient regions: the detections file and the choice of N_r boxes per image.

DOVE (Sec. III-A) pools N_r = 36 region features from boxes given by an RoI encoder. Boxes come
from an external detector, stored as JSON::

    {"format": "rsitr-detections-v1",
     "images": {"<image filename>": {"boxes": [[x1, y1, x2, y2], ...],   # original pixels
                                     "scores": [s1, ...],
                                     "labels": [...]}}}                    # labels optional

Image keys are the dataset's image filenames (as in ``RetrievalDataset.image_files``); a key may
also be just the base name. An image without an entry, or with no usable box, falls back to
:func:`rsitr.features.roi.default_boxes` (all 36 boxes valid), so extraction never depends on every image
having been detected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rsitr.errors import DatasetError
from rsitr.features.roi import default_boxes

DETECTIONS_FORMAT = "rsitr-detections-v1"

Detections = dict[str, tuple[np.ndarray, np.ndarray]]


def _parse_entry(path: Path, name: str, entry: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate one image's entry; returns ((k, 4) boxes, (k,) scores) as float32."""
    if not isinstance(entry, dict) or "boxes" not in entry or "scores" not in entry:
        raise DatasetError(path, f"image {name!r}: entry needs 'boxes' and 'scores'")
    try:
        boxes = np.asarray(entry["boxes"], dtype=np.float64)
        scores = np.asarray(entry["scores"], dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetError(path, f"image {name!r}: boxes and scores must be numbers") from None
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DatasetError(path, f"image {name!r}: boxes must be a list of [x1, y1, x2, y2], got shape {boxes.shape}")
    if scores.ndim != 1 or len(scores) != len(boxes):
        raise DatasetError(path, f"image {name!r}: {len(boxes)} boxes but scores of shape {scores.shape}")
    if "labels" in entry and entry["labels"] is not None and len(entry["labels"]) != len(boxes):
        raise DatasetError(path, f"image {name!r}: {len(boxes)} boxes but {len(entry['labels'])} labels")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise DatasetError(path, f"image {name!r}: boxes or scores are not finite")
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        raise DatasetError(path, f"image {name!r}: box {int(bad[0])} has x2 <= x1 or y2 <= y1")
    return boxes.astype(np.float32), scores.astype(np.float32)


def read_detections(path: str | Path) -> Detections:
    """Read and validate a detections file.

    Returns:
        image filename -> (boxes float32 (k, 4) in original pixels, scores float32 (k,)).

    Raises:
        DatasetError: missing or malformed file, or an invalid entry (names file and image).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "detections file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(path, f"cannot read detections JSON ({exc.__class__.__name__})") from exc
    if not isinstance(doc, dict) or doc.get("format") != DETECTIONS_FORMAT:
        raise DatasetError(path, f"not a detections file (expected \"format\": \"{DETECTIONS_FORMAT}\")")
    images = doc.get("images")
    if not isinstance(images, dict):
        raise DatasetError(path, "'images' must map image filenames to detections")
    return {str(name): _parse_entry(path, str(name), entry) for name, entry in images.items()}


def lookup(detections: Detections, image_file: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The entry of ``image_file``: by its dataset-relative name, else by its base name."""
    found = detections.get(image_file)
    if found is None:
        found = detections.get(Path(image_file).name)
    return found


def select_boxes(boxes: np.ndarray | None, scores: np.ndarray | None, original_size: tuple[int, int],
                 image_size: int, num_regions: int = 36) -> tuple[Tensor, Tensor]:
    """Choose ``num_regions`` boxes for one image and map them to the resized image.

    The image's own boxes when it has usable ones (:func:`own_boxes`); otherwise
    :func:`~rsitr.features.roi.default_boxes` (first ``num_regions`` of them, padded if fewer)
    with mask True.

    Returns:
        (boxes float32 (num_regions, 4) in resized pixels, mask bool (num_regions,)).
    """
    own = own_boxes(boxes, scores, original_size, image_size, num_regions)
    return own if own is not None else _padded(default_boxes(image_size)[:num_regions].numpy(), num_regions)


def own_boxes(boxes: np.ndarray | None, scores: np.ndarray | None, original_size: tuple[int, int],
              image_size: int, num_regions: int = 36) -> tuple[Tensor, Tensor] | None:
    """An image's own ``num_regions`` boxes in the resized image, or None when it has no usable box.

    Boxes are rescaled from the original ``(width, height)`` to the ``image_size`` square and
    clipped to it; boxes left with no area (entirely outside the image) are dropped. The
    ``num_regions`` highest-scoring boxes are kept (ties broken by lower index), and missing ones
    are padded with zero boxes whose mask is False.
    """
    if boxes is None or not len(boxes):
        return None
    chosen = _rescale_clip(boxes, original_size, image_size)
    keep = (chosen[:, 2] > chosen[:, 0]) & (chosen[:, 3] > chosen[:, 1])
    if not keep.any():
        return None
    order = np.argsort(-np.asarray(scores, dtype=np.float64)[keep], kind="stable")[:num_regions]
    return _padded(chosen[keep][order], num_regions)


def _padded(chosen: np.ndarray, num_regions: int) -> tuple[Tensor, Tensor]:
    """(num_regions, 4) boxes with the first ``len(chosen)`` real (mask True), the rest zero (mask False)."""
    out = torch.zeros(num_regions, 4, dtype=torch.float32)
    mask = torch.zeros(num_regions, dtype=torch.bool)
    k = len(chosen)
    out[:k] = torch.from_numpy(np.ascontiguousarray(chosen, dtype=np.float32))
    mask[:k] = True
    return out, mask


def _rescale_clip(boxes: np.ndarray, original_size: tuple[int, int], image_size: int) -> np.ndarray:
    """Map (k, 4) boxes from original ``(w, h)`` pixels to the ``image_size`` square, clipped."""
    w, h = original_size
    if w <= 0 or h <= 0 or not math.isfinite(w * h):
        raise ValueError(f"invalid original image size {original_size}")
    scale = np.array([image_size / w, image_size / h, image_size / w, image_size / h], dtype=np.float64)
    return np.clip(np.asarray(boxes, dtype=np.float64) * scale, 0.0, float(image_size))
