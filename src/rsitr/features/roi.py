"""RoIAlign in plain PyTorch, and the built-in box set used when no detections exist.

DOVE (Sec. III-A) takes N_r = 36 region features R_v from an RoI encoder over a ResNet-50 map;
they become F_R by Eq. 2. :func:`roi_align` pools one feature vector grid per box.

Semantics (RoIAlign with ``aligned=True``, as in Detectron2 and torchvision):

* A box ``(x1, y1, x2, y2)`` in input-image pixels maps to feature-map coordinates
  ``x * spatial_scale - 0.5`` (and likewise for y): the -0.5 makes pixel *centres* line up, so
  feature cell ``i`` has its centre at continuous coordinate ``i``.
* The mapped box is split into ``output_size x output_size`` equal bins (no minimum size).
* In each bin, ``sampling_ratio x sampling_ratio`` points are placed at the centres of a regular
  sub-grid: ``y = y1 + (ph + (iy + 0.5) / sampling_ratio) * bin_h`` and likewise for x.
* Each point's value is bilinear interpolation of the map. A point with ``y < -1`` or ``y > H``
  (or ``x < -1`` or ``x > W``) contributes 0; otherwise its coordinate is clamped to
  ``[0, H - 1]`` (resp. ``[0, W - 1]``) before interpolating.
* A bin's value is the mean of its ``sampling_ratio**2`` points (zeros included).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sample_coords(lo: Tensor, hi: Tensor, output_size: int, sampling_ratio: int) -> Tensor:
    """Sample positions along one axis: (B, N) box edges -> (B, N, output_size * sampling_ratio)."""
    steps = output_size * sampling_ratio
    frac = (torch.arange(steps, dtype=lo.dtype, device=lo.device) + 0.5) / steps
    return lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac


def _axis_weights(lo: Tensor, hi: Tensor, size: int, output_size: int, sampling_ratio: int) -> Tensor:
    """Interpolation weights of each bin along one axis: (B, N) box edges -> (B, N, output_size, size).

    Row ``p`` holds, for every cell of the axis, the bilinear weight it gets from the bin's
    ``sampling_ratio`` sample points, averaged over them, with the border rule of the module
    docstring (a point beyond ``[-1, size]`` weighs nothing; others are clamped to ``[0, size - 1]``).
    """
    coords = _sample_coords(lo, hi, output_size, sampling_ratio)  # (B, N, S)
    valid = ((coords >= -1.0) & (coords <= float(size))).to(coords.dtype)
    clamped = coords.clamp(0.0, float(size - 1))
    low = clamped.floor()
    upper_share = clamped - low
    first = low.long()
    second = (first + 1).clamp(max=size - 1)
    weights = coords.new_zeros(*coords.shape, size)
    weights.scatter_add_(-1, first.unsqueeze(-1), ((1.0 - upper_share) * valid).unsqueeze(-1))
    weights.scatter_add_(-1, second.unsqueeze(-1), (upper_share * valid).unsqueeze(-1))
    return weights.reshape(*lo.shape, output_size, sampling_ratio, size).mean(dim=-2)


def _check(features: Tensor, boxes: Tensor, output_size: int, sampling_ratio: int) -> None:
    if features.dim() != 4 or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"roi_align expects features (B,C,H,W) and boxes (B,N,4), got "
                         f"{tuple(features.shape)} and {tuple(boxes.shape)}")
    if output_size < 1 or sampling_ratio < 1:
        raise ValueError("roi_align needs output_size >= 1 and sampling_ratio >= 1")


def _bin_weights(boxes: Tensor, height: int, width: int, spatial_scale: float, output_size: int,
                 sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """Per box and bin, the float32 weights of the map rows (B, N, o, H) and columns (B, N, o, W).

    Bilinear interpolation and the bin's sample grid are both separable, and so is the validity
    rule (a point counts when its y and its x are in range), so bin (p, q) of a box weighs map cell
    (h, w) by ``rows[p, h] * cols[q, w]``.
    """
    scaled = boxes.to(torch.float32) * spatial_scale - 0.5
    rows = _axis_weights(scaled[..., 1], scaled[..., 3], height, output_size, sampling_ratio)
    cols = _axis_weights(scaled[..., 0], scaled[..., 2], width, output_size, sampling_ratio)
    return rows, cols


def _pool(features: Tensor, weights: Tensor) -> Tensor:
    """(B, K, H*W) cell weights applied to (B, C, H, W) maps: (B, K, C), in float32 (or float64 for float64 maps).

    The map is read as (B, H*W, C), a view for a channels_last map; a reduced-precision map is
    widened to float32 first, so every sum accumulates in float32, as the interpolation did before.
    """
    b, c, h, w = features.shape
    wide = torch.promote_types(features.dtype, torch.float32)
    cells = features.to(wide).permute(0, 2, 3, 1).reshape(b, h * w, c)
    return torch.bmm(weights.to(wide), cells)


def roi_align(features: Tensor, boxes: Tensor, spatial_scale: float, output_size: int = 2,
              sampling_ratio: int = 2) -> Tensor:
    """Pool ``output_size x output_size`` bins per box from a batch of feature maps.

    Computed as one batched product of a (boxes x bins, cells) weight matrix with the map
    (:func:`_bin_weights`): RoIAlign is linear in the map, and this form reads a channels_last
    map in place, where sampling it point by point was several times slower than the backbone's
    own share of the work on a CPU.

    Args:
        features: (B, C, H, W) feature maps.
        boxes: (B, N, 4) boxes ``x1, y1, x2, y2`` in input-image pixels, N per image.
        spatial_scale: feature-map size over input size, e.g. 1/16 for ResNet ``layer3``.
        output_size: bins per side.
        sampling_ratio: sample points per bin side (>= 1).

    Returns:
        (B, N, C, output_size, output_size), in the dtype of ``features`` (sums in float32 at least).
        See the module docstring for the exact definition (RoIAlign, ``aligned=True``).
    """
    _check(features, boxes, output_size, sampling_ratio)
    b, c, h, w = features.shape
    n, o = boxes.shape[1], output_size
    if n == 0:
        return features.new_zeros(b, 0, c, o, o)
    rows, cols = _bin_weights(boxes, h, w, spatial_scale, o, sampling_ratio)
    weights = (rows[:, :, :, None, :, None] * cols[:, :, None, :, None, :]).reshape(b, n * o * o, h * w)
    pooled = _pool(features, weights).reshape(b, n, o, o, c)
    return pooled.permute(0, 1, 4, 2, 3).to(features.dtype)


def roi_mean(features: Tensor, boxes: Tensor, spatial_scale: float, output_size: int = 2,
             sampling_ratio: int = 2) -> Tensor:
    """The mean over the bins of :func:`roi_align`: one (B, N, C) vector per box, float32 (float64 for float64 maps).

    The same value as ``roi_align(...).mean(dim=(3, 4))`` (up to float summation order): the bin
    weights are averaged before they meet the map, so the product is ``output_size**2`` times smaller.
    """
    _check(features, boxes, output_size, sampling_ratio)
    b, c, h, w = features.shape
    n = boxes.shape[1]
    if n == 0:
        return features.new_zeros(b, 0, c, dtype=torch.promote_types(features.dtype, torch.float32))
    rows, cols = _bin_weights(boxes, h, w, spatial_scale, output_size, sampling_ratio)
    weights = rows.mean(dim=2).unsqueeze(-1) * cols.mean(dim=2).unsqueeze(-2)  # (B, N, H, W)
    return _pool(features, weights.reshape(b, n, h * w))


def _grid(image_size: int, cols: int, rows: int) -> list[list[float]]:
    """Boxes of a ``cols x rows`` tiling of the square image, row-major."""
    cw, rh = image_size / cols, image_size / rows
    return [[j * cw, i * rh, (j + 1) * cw, (i + 1) * rh] for i in range(rows) for j in range(cols)]


#: (columns, rows) of the tilings making up :func:`default_boxes`: 1 + 4 + 9 + 16 + 6 = 36.
DEFAULT_GRIDS = ((1, 1), (2, 2), (3, 3), (4, 4), (3, 2))


def default_boxes(image_size: int) -> Tensor:
    """The 36 multi-scale boxes used when an image has no detections, in resized pixels.

    In order: the whole image (1), a 2x2 grid (4), a 3x3 grid (9), a 4x4 grid (16) and a
    3-column x 2-row grid (6). They cover the image at five scales, standing in for the 36
    detected salient regions of DOVE (N_r = 36) when no detector output is available.

    Returns:
        float32 (36, 4) boxes ``x1, y1, x2, y2`` inside ``[0, image_size]``.
    """
    boxes = [box for cols, rows in DEFAULT_GRIDS for box in _grid(image_size, cols, rows)]
    return torch.tensor(boxes, dtype=torch.float32)
