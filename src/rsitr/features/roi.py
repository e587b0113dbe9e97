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
import torch.nn.functional as F
from torch import Tensor


def _sample_coords(lo: Tensor, hi: Tensor, output_size: int, sampling_ratio: int) -> Tensor:
    """Sample positions along one axis: (B, N) box edges -> (B, N, output_size * sampling_ratio)."""
    steps = output_size * sampling_ratio
    frac = (torch.arange(steps, dtype=lo.dtype, device=lo.device) + 0.5) / steps
    return lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac


def _normalise(coord: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Clamp to the border rule above and map to grid_sample's [-1, 1] (align_corners=True)."""
    valid = (coord >= -1.0) & (coord <= float(size))
    clamped = coord.clamp(0.0, float(size - 1))
    norm = clamped / max(size - 1, 1) * 2.0 - 1.0
    return norm, valid


def roi_align(features: Tensor, boxes: Tensor, spatial_scale: float, output_size: int = 2,
              sampling_ratio: int = 2) -> Tensor:
    """Pool ``output_size x output_size`` bins per box from a batch of feature maps.

    Args:
        features: (B, C, H, W) feature maps.
        boxes: (B, N, 4) boxes ``x1, y1, x2, y2`` in input-image pixels, N per image.
        spatial_scale: feature-map size over input size, e.g. 1/16 for ResNet ``layer3``.
        output_size: bins per side.
        sampling_ratio: sample points per bin side (>= 1).

    Returns:
        (B, N, C, output_size, output_size), in the dtype of ``features``. See the module
        docstring for the exact definition (RoIAlign, ``aligned=True``).
    """
    if features.dim() != 4 or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"roi_align expects features (B,C,H,W) and boxes (B,N,4), got "
                         f"{tuple(features.shape)} and {tuple(boxes.shape)}")
    if output_size < 1 or sampling_ratio < 1:
        raise ValueError("roi_align needs output_size >= 1 and sampling_ratio >= 1")
    b, c, h, w = features.shape
    n = boxes.shape[1]
    steps = output_size * sampling_ratio
    if n == 0:
        return features.new_zeros(b, 0, c, output_size, output_size)
    scaled = boxes.to(torch.float32) * spatial_scale - 0.5
    xs = _sample_coords(scaled[..., 0], scaled[..., 2], output_size, sampling_ratio)  # (B, N, S)
    ys = _sample_coords(scaled[..., 1], scaled[..., 3], output_size, sampling_ratio)
    gx, vx = _normalise(xs, w)
    gy, vy = _normalise(ys, h)
    # Separable grid: rows follow y, columns follow x. Stack the N boxes along the row axis.
    grid = torch.stack(torch.broadcast_tensors(gx.unsqueeze(-2), gy.unsqueeze(-1)), dim=-1)  # (B,N,S,S,2)
    grid = grid.reshape(b, n * steps, steps, 2).to(features.dtype)
    sampled = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=True)
    valid = (vy.unsqueeze(-1) & vx.unsqueeze(-2)).to(features.dtype)  # (B, N, S, S)
    sampled = sampled.reshape(b, c, n, steps, steps) * valid.unsqueeze(1)
    bins = sampled.reshape(b, c, n, output_size, sampling_ratio, output_size, sampling_ratio).mean(dim=(4, 6))
    return bins.permute(0, 2, 1, 3, 4)


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
