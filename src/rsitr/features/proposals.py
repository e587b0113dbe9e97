"""Activation region proposals: N_r boxes per image from the frozen backbone's own activations.

DOVE (Sec. III-A) pools its N_r = 36 region features R_v over salient regions found by an RoI
encoder, and ROAM uses them as the image's orientation: IFA fuses them with the multiscale
features, and IGA averages them (Eq. 23, E_R) to guide the caption. Without a detections file
every image gets the same fixed boxes (:func:`rsitr.features.roi.default_boxes`); RoIAlign is
linear in the map, so E_R is then one fixed linear function of the ``layer3`` map, much like the
pooled ``level3`` feature the multiscale input already holds, and IGA has nothing regional left
to orient by. :func:`activation_boxes` chooses the boxes per image instead, with no detector and
no classes, from the maps the feature extraction has already computed (no second backbone pass).

The algorithm (``FeatureSpec.boxes = "activation"``), for each image of a batch:

1. **Energy maps.** For the region level's map (``layer3`` for DOVE) and the backbone's deepest
   map (``layer4``), the channel energy of every cell: the root mean square over channels,
   ``e(y, x) = sqrt(mean_c a_c(y, x)^2)``. A frozen CNN's activations are strongest where there
   are objects and structures; the deeper map responds to whole objects and ignores fine texture,
   the region level's map is finer and is the map the regions are pooled from.
2. **Saliency.** The deeper energy map is resized to the region level's grid (bilinear,
   ``align_corners=False``); each map is then min–max normalised to [0, 1] within the image (a
   constant map becomes 0), so that neither level dominates by its scale and an image's contrast,
   not its overall activation, decides; the saliency ``s`` is their mean.
3. **Candidates.** On every cell ``(i, j)`` of the region level's grid (``H x W`` cells of
   ``stride`` pixels), centred on the cell centre ``((j + 0.5) stride, (i + 0.5) stride)`` — the
   convention of :func:`rsitr.features.roi.roi_align` —, one box per side and aspect ratio:
   side ``f * image_size`` for ``f`` in :data:`SIDES` and width / height ratio ``r`` in
   :data:`ASPECTS` at the same area (width ``f S sqrt(r)``, height ``f S / sqrt(r)``). A box
   reaching past the image is shifted inside it (never shrunk). Candidates are ordered by side,
   then ratio, then row, then column; this order breaks ties.
4. **Score: centre–surround contrast.** A candidate's score is the mean saliency inside it minus
   the mean saliency of its ring: the box grown :data:`SURROUND` times about its own centre,
   clipped to the image, minus the box itself (a ring of zero area counts as the box's own mean,
   score 0). Means weight every cell by the exact area of it the box covers. This is a
   difference-of-box-filters blob detector on the saliency map: it is highest for a box that
   fits a bright blob, at the blob's scale, and it is comparable across sides and ratios.
5. **Selection: greedy non-maximum suppression, filled up to N_r.** Repeat N_r times: take the
   best-scoring candidate whose IoU with every box taken so far is at most
   :data:`IOU_THRESHOLD` (ties: the lowest index); when none is left, the best-scoring candidate
   not yet taken. When there are fewer candidates than N_r (tiny images), the taken list repeats
   from its start. Every box is real (the region mask is all True) and inside the image.

Everything is deterministic (float64 scores, first index on ties) and per image: a box depends on
its own image only, never on the rest of its batch. The constants, and why:

* :data:`SIDES` ``= (1/8, 1/4, 3/8, 1/2)`` of the image side: at DOVE's 256 px the smallest is
  32 px, two ``layer3`` cells, the least for 2 × 2 RoIAlign bins to see one cell each, and near
  the size of the small objects of RSICD / RSITMD scenes (cars, tanks, planes at 0.3–1 m per
  pixel); the largest is half the side, since a box near the whole image repeats the pooled
  features the multiscale input already has.
* :data:`ASPECTS` ``= (1, 2, 1/2)``: aerial objects are often elongated (runways, bridges, ships,
  rows of parked cars, roads), either way since aerial scenes have no up.
* :data:`SURROUND` ``= 2``: the ring then has three times the box's area when nothing clips it,
  a wide enough context to tell a blob from a bright wide area.
* :data:`IOU_THRESHOLD` ``= 0.5``, the usual NMS threshold of detectors: near-duplicates from
  neighbouring centres are suppressed, while nested boxes at different sides on one peak survive
  (a box inside one twice its side has IoU 1/4), which keeps each salient spot at several scales.

A detections file still wins: images with an entry keep their detector boxes
(:func:`rsitr.features.compute.backbone_features`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

#: Changes whenever the algorithm or a constant changes: it enters the feature-cache key.
PROPOSALS_VERSION = "activation-v1"
#: Box sides as fractions of the image side.
SIDES = (1 / 8, 1 / 4, 3 / 8, 1 / 2)
#: Width / height ratios, each at the area of the square of the same side.
ASPECTS = (1.0, 2.0, 0.5)
#: The surround box's side over the box's side (centre–surround contrast).
SURROUND = 2.0
#: Candidates overlapping a chosen box by more than this IoU are suppressed.
IOU_THRESHOLD = 0.5


def proposal_levels(level_names: Sequence[str], region_level: str) -> list[int]:
    """Indices of the maps proposals read: the region level's, then the deepest (once if the same)."""
    first, last = list(level_names).index(region_level), len(level_names) - 1
    return [first] if first == last else [first, last]


def energy_map(level: Tensor) -> Tensor:
    """Channel energy of a (B, C, H, W) map: the root mean square over channels, (B, H, W) float64."""
    return level.detach().float().square().mean(dim=1).sqrt().double()


def _min_max(maps: Tensor) -> Tensor:
    """Each (H, W) map of a (B, H, W) batch scaled to [0, 1]; a constant map becomes 0."""
    flat = maps.flatten(1)
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    span = hi - lo
    scale = torch.where(span > 0, 1.0 / span, 0.0)  # the 1/0 of a constant map is discarded
    return (maps - lo[:, None, None]) * scale[:, None, None]


def saliency_map(levels: Sequence[Tensor]) -> Tensor:
    """Steps 1–2: the mean of the min–max normalised energy maps, on the first map's grid, (B, H, W) float64."""
    if not levels:
        raise ValueError("saliency_map needs at least one feature map")
    size = tuple(levels[0].shape[-2:])
    parts = []
    for level in levels:
        energy = energy_map(level)
        if tuple(energy.shape[-2:]) != size:
            energy = F.interpolate(energy[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        parts.append(_min_max(energy))
    return torch.stack(parts).mean(dim=0)


@lru_cache(maxsize=32)
def _candidates(height: int, width: int, stride: float, image_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3 and the coverage tables of step 4 for one grid; cached since they depend on no image.

    Returns:
        boxes (K, 4) float64 in pixels; ``inside`` and ``surround`` coverage as (K, H) row and
        (K, W) column overlaps in cell units stacked into (2, K, max(H, W)) each.
    """
    size = float(image_size)
    boxes = []
    for side in SIDES:
        for aspect in ASPECTS:
            w = min(side * size * math.sqrt(aspect), size)
            h = min(side * size / math.sqrt(aspect), size)
            for i in range(height):
                for j in range(width):
                    cx, cy = (j + 0.5) * stride, (i + 0.5) * stride
                    x1 = min(max(cx - w / 2, 0.0), size - w)
                    y1 = min(max(cy - h / 2, 0.0), size - h)
                    boxes.append((x1, y1, x1 + w, y1 + h))
    box = torch.tensor(boxes, dtype=torch.float64)
    centre = (box[:, :2] + box[:, 2:]) / 2
    half = (box[:, 2:] - box[:, :2]) * (SURROUND / 2)
    outer = torch.cat([centre - half, centre + half], dim=1).clamp(0.0, size)
    return box, _coverage(box, height, width, stride), _coverage(outer, height, width, stride)


def _coverage(boxes: Tensor, height: int, width: int, stride: float) -> Tensor:
    """Length of each cell's row / column span that each box covers, in cell units: (2, K, max(H, W))."""
    n = max(height, width)
    cells = torch.arange(n, dtype=torch.float64)
    out = torch.zeros(2, len(boxes), n, dtype=torch.float64)
    for axis, count in ((0, height), (1, width)):
        lo, hi = boxes[:, 1 - axis] / stride, boxes[:, 3 - axis] / stride  # axis 0 = rows (y), 1 = columns (x)
        overlap = (torch.minimum(hi[:, None], cells + 1) - torch.maximum(lo[:, None], cells)).clamp(min=0.0)
        out[axis, :, :count] = overlap[:, :count]
    return out


def _box_sums(saliency: Tensor, coverage: Tensor) -> tuple[Tensor, Tensor]:
    """Area-weighted saliency sums (B, K) and covered areas (K,) of boxes given by their coverage."""
    h, w = saliency.shape[-2:]
    rows, cols = coverage[0, :, :h], coverage[1, :, :w]
    sums = torch.einsum("bij,ki,kj->bk", saliency, rows, cols)
    return sums, rows.sum(dim=1) * cols.sum(dim=1)


def box_scores(saliency: Tensor, stride: float, image_size: int) -> tuple[Tensor, Tensor]:
    """Step 4: the candidate boxes of the saliency grid and their centre–surround scores.

    Args:
        saliency: (B, H, W) saliency on the region level's grid.
        stride: pixels per cell of that grid.
        image_size: side of the (square) image in pixels.

    Returns:
        (K, 4) float64 candidate boxes ``x1, y1, x2, y2`` in pixels, (B, K) float64 scores.
    """
    h, w = saliency.shape[-2:]
    boxes, inside, surround = (t.to(saliency.device) for t in _candidates(int(h), int(w), float(stride), int(image_size)))
    saliency = saliency.double()
    sum_in, area_in = _box_sums(saliency, inside)
    sum_out, area_out = _box_sums(saliency, surround)
    mean_in = sum_in / area_in.clamp(min=1e-12)
    ring_area = area_out - area_in
    has_ring = ring_area > 1e-9
    mean_ring = torch.where(has_ring, (sum_out - sum_in) / torch.where(has_ring, ring_area, 1.0), mean_in)
    return boxes, mean_in - mean_ring


def box_iou(box: Tensor, boxes: Tensor, areas: Tensor | None = None) -> Tensor:
    """IoU of one box per image (B, 4) with every candidate (K, 4) of area ``areas`` (K,): (B, K)."""
    lo = torch.maximum(box[:, None, :2], boxes[None, :, :2])
    hi = torch.minimum(box[:, None, 2:], boxes[None, :, 2:])
    inter = (hi - lo).clamp(min=0.0).prod(dim=-1)
    area = (box[:, 2:] - box[:, :2]).prod(dim=-1)
    if areas is None:
        areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=-1)
    return inter / (area[:, None] + areas[None, :] - inter).clamp(min=1e-12)


def select_proposals(boxes: Tensor, scores: Tensor, num_regions: int, iou_threshold: float = IOU_THRESHOLD) -> Tensor:
    """Step 5: indices (B, num_regions) of the chosen candidates, by greedy NMS filled up to ``num_regions``."""
    b, k = scores.shape
    chosen = torch.zeros(b, num_regions, dtype=torch.long, device=scores.device)
    rows = torch.arange(b, device=scores.device)
    free = torch.ones(b, k, dtype=torch.bool, device=scores.device)  # not suppressed and not taken
    untaken = torch.ones_like(free)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=-1)
    for t in range(num_regions):
        if t >= k:
            chosen[:, t] = chosen[:, t - k]
            continue
        pool = torch.where(free.any(dim=1, keepdim=True), free, untaken)
        index = scores.masked_fill(~pool, float("-inf")).argmax(dim=1)  # first maximum on ties
        chosen[:, t] = index
        untaken[rows, index] = False
        free &= untaken & (box_iou(boxes[index], boxes, areas) <= iou_threshold)
    return chosen


def activation_boxes(levels: Sequence[Tensor], stride: float, image_size: int, num_regions: int) -> Tensor:
    """The ``num_regions`` activation proposals of each image of a batch (the module's algorithm).

    Args:
        levels: backbone maps of one batch, the region level's (B, C, H, W) first, then the deeper
            map(s) (any size; resized to the first). Gradients never flow into the boxes.
        stride: pixels per cell of the first map (the backbone's stride of that level).
        image_size: side of the square input images in pixels.
        num_regions: N_r, boxes per image.

    Returns:
        float32 (B, num_regions, 4) boxes ``x1, y1, x2, y2`` in image pixels, inside the image.
    """
    batch = levels[0].shape[0]
    if num_regions == 0:
        return torch.zeros(batch, 0, 4, device=levels[0].device)
    with torch.no_grad():
        boxes, scores = box_scores(saliency_map(levels), stride, image_size)
        return boxes[select_proposals(boxes, scores, num_regions)].float()
