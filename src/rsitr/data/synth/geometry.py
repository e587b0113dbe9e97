"""Object shapes, boxes and polygon masks, shared by placement (where objects fit) and rendering.

Shapes are defined in an object frame (x along the object's main axis, centred at the origin)
and moved into the image by :func:`rotate`. Placement and drawing use the same outlines, so a
detection box is exactly the extent of what is drawn.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]


def rotate(cx: float, cy: float, points: list[Point], angle: float) -> list[Point]:
    """Rotate object-frame points (x along the main axis) by ``angle`` degrees and move to (cx, cy)."""
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def rect_points(length: float, width: float) -> list[Point]:
    """Corners of a length x width rectangle centred at the origin."""
    hl, hw = length / 2, width / 2
    return [(-hl, -hw), (hl, -hw), (hl, hw), (-hl, hw)]


def plane_parts(length: float) -> list[list[Point]]:
    """Fuselage, swept wings and tail of a plane pointing along +x, in the object frame."""
    L = length
    w = 0.13 * L
    fuselage = [(0.5 * L, 0.0), (0.42 * L, -w / 2), (-0.5 * L, -w / 2), (-0.5 * L, w / 2), (0.42 * L, w / 2)]
    wings = [
        (0.15 * L, -w / 2), (-0.1 * L, -0.48 * L), (-0.22 * L, -0.48 * L), (-0.06 * L, -w / 2),
        (-0.06 * L, w / 2), (-0.22 * L, 0.48 * L), (-0.1 * L, 0.48 * L), (0.15 * L, w / 2),
    ]
    tail = [
        (-0.36 * L, -w / 2), (-0.46 * L, -0.2 * L), (-0.52 * L, -0.2 * L), (-0.47 * L, 0.0),
        (-0.52 * L, 0.2 * L), (-0.46 * L, 0.2 * L), (-0.36 * L, w / 2),
    ]
    return [fuselage, wings, tail]


def ship_hull(length: float, width: float) -> list[Point]:
    """Hull outline of a ship with a pointed bow along +x."""
    hl, hw = length / 2, width / 2
    return [(hl, 0.0), (0.25 * length, -hw), (-hl, -hw * 0.85), (-hl, hw * 0.85), (0.25 * length, hw)]


def outline(cls: str, cx: float, cy: float, length: float, width: float, angle: float) -> list[Point]:
    """Image-frame points whose bounding box is the object's box."""
    if cls in ("storage_tank", "tree"):
        r = length / 2
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if cls == "plane":
        return [p for part in plane_parts(length) for p in rotate(cx, cy, part, angle)]
    if cls == "ship":
        return rotate(cx, cy, ship_hull(length, width), angle)
    return rotate(cx, cy, rect_points(length, width), angle)


def bounding_box(points: list[Point], size: int) -> tuple[int, int, int, int]:
    """Integer box enclosing ``points``, clipped to the image."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x1 = max(0, math.floor(min(xs)))
    y1 = max(0, math.floor(min(ys)))
    x2 = min(size, math.ceil(max(xs)))
    y2 = min(size, math.ceil(max(ys)))
    return (x1, y1, x2, y2)


def polygon_mask(polygon: list[Point] | tuple[Point, ...], size: int) -> np.ndarray:
    """Boolean mask of a filled polygon, drawn with the same rasteriser as the image."""
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon(list(polygon), fill=1)
    return np.asarray(img, dtype=bool)
