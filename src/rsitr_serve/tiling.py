"""Cutting an image into tiles: the pixel windows the indexer reads, at one or more scales.

A tile is a square window of the source image at a size multiplier ``scale``: its side is
``size = round(tile * scale)`` source pixels, later resized to the model's input side, so a scale
above 1 sees a wider area at coarser detail and a scale below 1 a smaller one at finer detail.

For each scale, in the order given:

* The window side is ``size = round(tile * scale)``; the stride is ``max(1, round(size * (1 - overlap)))``
  (Python's ``round``, half to even).
* Along each axis the windows start at 0, stride, 2·stride, … and the last one is shifted back to end
  exactly at the image edge, so full-size windows cover the whole image and none sticks out: no
  partial tiles, no padding. A start that appears twice is kept once.
* An axis shorter than ``size`` gets one window spanning that whole axis (a 300 × 100 image at tile
  256 gives windows 256 × 100 along x). An image no larger than ``size`` in both axes is one window,
  the whole image (0, 0, width, height).
* A window identical (same x, y, width, height) to a window of an earlier scale is dropped; the first
  scale that produced it keeps it. Two windows are identical only when they have the same width and
  height, which (for distinct scales) happens only when both scales see the whole image along both
  axes, or when both round to the same ``size``: so a scale is either kept whole or dropped whole.
* Order: by scale as given, then row-major (y, then x). The result depends on the arguments only.

Tiles are :class:`rsitr.data.rasters.TileWindow` (the library's pixel window, which its raster
reader reads). They compare field by field (scale, x, y, width, height), which is *not* the order
:func:`iter_tile_windows` yields: sorting a tile list is not a way to restore it.

:func:`count_tiles` counts without building the list (a 20,000 × 20,000 scene at tile 256 and overlap
0.5 is about 24,000 windows per scale; counting costs a few arithmetic operations per scale).
:func:`check_tiling` refuses settings that make no sense, each with a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from rsitr.data.rasters import TileWindow
from rsitr.errors import ConfigError

MIN_TILE = 16
#: Overlaps at or above this are refused: at 0.95 each pixel is in 400 windows of one scale.
MAX_OVERLAP = 0.95


def check_tiling(tile: int, overlap: float, scales: Sequence[float]) -> None:
    """ConfigError with a one-line message when ``tile``, ``overlap`` or ``scales`` are unusable.

    Rules: ``tile`` is an integer of at least 16 px; ``0 <= overlap < 0.95``; ``scales`` is non-empty,
    each scale a finite number > 0 whose window ``round(tile * scale)`` is at least 16 px, with no
    scale given twice.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < MIN_TILE:
        raise ConfigError(f"the tile side must be an integer of at least {MIN_TILE} pixels, got {tile!r}")
    if not isinstance(overlap, (int, float)) or not 0 <= overlap < MAX_OVERLAP:
        raise ConfigError(f"the tile overlap must be in [0, {MAX_OVERLAP}) (a fraction of the tile side), got {overlap!r}")
    if len(scales) == 0:
        raise ConfigError("at least one tile scale is needed, got none")
    for scale in scales:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"tile scales must be finite numbers > 0, got {scale!r}")
        if round(tile * scale) < MIN_TILE:
            raise ConfigError(f"tile scale {scale} gives {round(tile * scale)} px windows at tile {tile}; "
                              f"the smallest window is {MIN_TILE} px")
    if len(set(scales)) != len(scales):
        repeated = sorted({s for s in scales if list(scales).count(s) > 1})
        raise ConfigError(f"tile scales must be distinct, got {', '.join(map(str, repeated))} more than once")


def _check_size(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ConfigError(f"an image to tile must be at least 1 × 1 pixel, got {width} × {height}")


def _window_side(tile: int, scale: float) -> int:
    return round(tile * scale)


def _stride(size: int, overlap: float) -> int:
    return max(1, round(size * (1 - overlap)))


def _axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one axis: 0, stride, … and ``length - size`` last; ``[0]`` when the axis fits."""
    if length <= size:
        return [0]
    return [*range(0, length - size, stride), length - size]


def _axis_count(length: int, size: int, stride: int) -> int:
    """``len(_axis_starts(length, size, stride))`` without building it."""
    if length <= size:
        return 1
    return -(-(length - size) // stride) + 1


def _axis_layout(length: int, size: int, stride: int) -> tuple[int, int]:
    """What decides the windows of one axis: (window length, stride), stride 0 when the axis fits whole.

    Two scales with equal layouts along both axes give identical windows; with any layout differing,
    no window of one equals a window of the other (their widths or heights differ).
    """
    return (length, 0) if length <= size else (size, stride)


def _distinct_scales(width: int, height: int, tile: int, overlap: float,
                     scales: Sequence[float]) -> Iterator[tuple[float, int, int]]:
    """(scale, size, stride) of each scale whose windows no earlier scale produced, in the order given."""
    seen: set[tuple[tuple[int, int], tuple[int, int]]] = set()
    for scale in scales:
        size = _window_side(tile, scale)
        stride = _stride(size, overlap)
        layout = (_axis_layout(width, size, stride), _axis_layout(height, size, stride))
        if layout not in seen:
            seen.add(layout)
            yield scale, size, stride


def iter_tile_windows(width: int, height: int, tile: int, overlap: float, scales: Sequence[float]) -> Iterator[TileWindow]:
    """The tiles of a ``width`` × ``height`` image, lazily, in the order of the module docstring.

    The arguments are checked at the call (not at the first ``next``): ConfigError on bad tiling
    settings or an empty image.
    """
    check_tiling(tile, overlap, scales)
    _check_size(width, height)
    return _generate(width, height, tile, overlap, tuple(scales))


def _generate(width: int, height: int, tile: int, overlap: float, scales: Sequence[float]) -> Iterator[TileWindow]:
    for scale, size, stride in _distinct_scales(width, height, tile, overlap, scales):
        window_width, window_height = min(size, width), min(size, height)
        xs = _axis_starts(width, size, stride)
        for y in _axis_starts(height, size, stride):
            for x in xs:
                yield TileWindow(scale, x, y, window_width, window_height)


def tile_windows(width: int, height: int, tile: int, overlap: float, scales: Sequence[float]) -> list[TileWindow]:
    """All tiles of a ``width`` × ``height`` image as a list: ``list(iter_tile_windows(...))``."""
    return list(iter_tile_windows(width, height, tile, overlap, scales))


def count_tiles(width: int, height: int, tile: int, overlap: float, scales: Sequence[float]) -> int:
    """``len(tile_windows(...))`` in a few operations per scale, without building any window."""
    check_tiling(tile, overlap, scales)
    _check_size(width, height)
    return sum(_axis_count(width, size, stride) * _axis_count(height, size, stride)
               for _, size, stride in _distinct_scales(width, height, tile, overlap, scales))
