"""Rendering: drawing a :class:`SceneDescription` as a top-down, aerial-style RGB image.

Drawing order, bottom to top: land-cover texture, textured regions (water, fields, apron,
clearing), forest canopy, flat regions (piers, parking lines), roads, shadows, objects, and a
final sensor noise. Shapes come from :mod:`.geometry`, the same outlines the boxes were taken
from, so every detection box holds its object.

The renderer has its own random stream (texture, details, noise); it never changes the scene.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from rsitr.data.synth.geometry import plane_parts, polygon_mask, rect_points, rotate, ship_hull
from rsitr.data.synth.scene import Region, SceneDescription, SceneObject

RGB = tuple[int, int, int]

#: Base RGB of each land cover and region texture.
COVER_RGB: dict[str, tuple[float, float, float]] = {
    "grass": (95, 140, 60),
    "sand": (215, 190, 140),
    "forest": (38, 80, 38),
    "soil": (140, 105, 75),
    "urban": (125, 125, 120),
    "water": (38, 78, 118),
    "apron": (168, 168, 162),
    "field_green": (85, 145, 55),
    "field_yellow": (205, 185, 95),
    "field_brown": (150, 110, 70),
}

#: (blotch amplitude, pixel grain) of each texture; other kinds use (6, 5).
_TEXTURE_NOISE: dict[str, tuple[float, float]] = {
    "grass": (10, 6), "sand": (8, 4), "forest": (8, 9), "soil": (12, 8), "urban": (7, 6),
    "water": (6, 2.5), "apron": (5, 4),
}

_SHADOW: RGB = (40, 40, 36)

#: Shadow offset per class at 128 px (ships float: no shadow).
_SHADOW_OFFSET: dict[str, float] = {"building": 2.5, "plane": 1.5, "storage_tank": 2.0, "tree": 1.5, "car": 0.8, "ship": 0.0}


# -- textures --------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in roughly [-2, 2]: a coarse Gaussian grid upsampled bilinearly."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A full-image float RGB texture of land cover ``kind`` (blotches, grain and patterns)."""
    base = np.array(COVER_RGB[kind], dtype=np.float32) + rng.normal(0, 5, 3).astype(np.float32)
    amp, grain = _TEXTURE_NOISE.get(kind, (6, 5))
    low = _smooth_noise(rng, size, max(3, size // 16))[:, :, None]
    arr = base + amp * low + rng.normal(0, grain, (size, size, 1)).astype(np.float32)
    pattern = _cover_pattern(rng, kind, size)
    if pattern is not None:
        arr += pattern
    return arr


def _cover_pattern(rng: np.random.Generator, kind: str, size: int) -> np.ndarray | None:
    """The structure that tells land covers apart: dune ripples, city blocks, crop rows, grass tint."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "sand":
        a = float(rng.uniform(0, math.pi))
        period = float(rng.uniform(10, 20)) * size / 128
        phase = (xx * math.cos(a) + yy * math.sin(a)) / period * 2 * math.pi
        return (14 * np.sin(phase + 1.5 * _smooth_noise(rng, size, 4)))[:, :, None]
    if kind == "urban":
        blocks = np.asarray(Image.fromarray(rng.standard_normal((8, 8)).astype(np.float32)).resize(
            (size, size), Image.Resampling.NEAREST), dtype=np.float32)
        return 6 * blocks[:, :, None]
    if kind.startswith("field_"):
        period = float(rng.uniform(3, 5)) * size / 128
        coord = xx if rng.random() < 0.5 else yy
        return (9 * np.sin(coord / period * 2 * math.pi))[:, :, None]
    if kind == "grass":
        return (6 * _smooth_noise(rng, size, 5))[:, :, None] * np.array([1.0, 0.3, -0.5], dtype=np.float32)
    return None


def _forest_canopy(img: Image.Image, rng: np.random.Generator, mask: np.ndarray | None = None) -> None:
    """Cover the image (or the True part of ``mask``) with small overlapping tree crowns."""
    draw = ImageDraw.Draw(img)
    size = img.size[0]
    k = size / 128
    n = int(size * size / (16 * k * k))
    centres = rng.uniform(0, size, (n, 2))
    radii = rng.uniform(2.0, 4.0, n) * k
    shades = rng.integers(-22, 23, n)
    for (x, y), r, sh in zip(centres.tolist(), radii.tolist(), shades.tolist()):
        if mask is not None and not mask[min(size - 1, int(y)), min(size - 1, int(x))]:
            continue
        g = 80 + int(sh)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(30 + int(sh) // 3, g, 30 + int(sh) // 3))


# -- roads and objects -----------------------------------------------------------------------


def _darker(rgb: RGB, f: float) -> RGB:
    """``rgb`` scaled by ``f`` (f < 1 darkens, > 1 lightens), clipped."""
    return tuple(int(max(0, min(255, c * f))) for c in rgb)  # type: ignore[return-value]


def _draw_road(draw: ImageDraw.ImageDraw, o: SceneObject, k: float) -> None:
    """A road band with markings: runway edge lines and dashes, street centre dashes."""
    draw.polygon(rotate(o.cx, o.cy, rect_points(o.length, o.width), o.angle), fill=o.rgb)
    if o.kind == "runway":
        for off in (-o.width / 2 + 1.5 * k, o.width / 2 - 1.5 * k):
            draw.polygon(rotate(o.cx, o.cy, [(x, y + off) for x, y in rect_points(o.length, 0.8 * k)], o.angle),
                         fill=(225, 225, 225))
        dash, step = 6 * k, 12 * k
    elif o.kind in ("road", "street") and o.width >= 6 * k:
        dash, step = 3 * k, 7 * k
    else:
        return
    colour = (235, 235, 235) if o.kind != "street" else (225, 205, 90)
    t = -o.length / 2
    while t < o.length / 2:
        seg = [(t, -0.5 * k), (t + dash, -0.5 * k), (t + dash, 0.5 * k), (t, 0.5 * k)]
        draw.polygon(rotate(o.cx, o.cy, seg, o.angle), fill=colour)
        t += step


def _draw_building(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
                   water: np.ndarray) -> None:
    """A roof with an outline: pitched (ridge and shaded half) for houses, rooftop units otherwise."""
    pts = rotate(o.cx, o.cy, rect_points(o.length, o.width), o.angle)
    draw.polygon(pts, fill=o.rgb, outline=_darker(o.rgb, 0.75))
    if o.kind in ("house", "farmhouse", "cabin"):
        half = rotate(o.cx, o.cy, [(-o.length / 2, 0), (o.length / 2, 0), (o.length / 2, o.width / 2),
                                   (-o.length / 2, o.width / 2)], o.angle)
        draw.polygon(half, fill=_darker(o.rgb, 0.82))
        return
    for _ in range(int(rng.integers(1, 4))):
        ux, uy = rng.uniform(-0.35, 0.35) * o.length, rng.uniform(-0.3, 0.3) * o.width
        unit = rotate(o.cx, o.cy, [(ux - k, uy - k), (ux + k, uy - k), (ux + k, uy + k), (ux - k, uy + k)], o.angle)
        draw.polygon(unit, fill=_darker(o.rgb, 0.7))


def _draw_plane(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
                water: np.ndarray) -> None:
    """Fuselage, wings and tail in the plane's colour."""
    for part in plane_parts(o.length):
        draw.polygon(rotate(o.cx, o.cy, part, o.angle), fill=o.rgb)


def _draw_storage_tank(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
                       water: np.ndarray) -> None:
    """A round tank seen from above: darker rim, lid and a central vent."""
    r = o.length / 2
    draw.ellipse((o.cx - r, o.cy - r, o.cx + r, o.cy + r), fill=_darker(o.rgb, 0.85))
    ri = r * 0.8
    draw.ellipse((o.cx - ri, o.cy - ri, o.cx + ri, o.cy + ri), fill=o.rgb)
    rc = max(0.8 * k, r * 0.12)
    draw.ellipse((o.cx - rc, o.cy - rc, o.cx + rc, o.cy + rc), fill=_darker(o.rgb, 0.7))


def _draw_ship(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
               water: np.ndarray) -> None:
    """Hull and cabin, with a wake behind when the wake lies entirely on water."""
    wake = rotate(o.cx, o.cy, [(-o.length / 2, -o.width * 0.35), (-o.length * 1.1, -o.width * 0.9),
                               (-o.length * 1.1, o.width * 0.9), (-o.length / 2, o.width * 0.35)], o.angle)
    size = water.shape[0]
    if all(0 <= x < size and 0 <= y < size and water[int(y), int(x)] for x, y in wake):
        draw.polygon(wake, fill=(95, 130, 160))
    draw.polygon(rotate(o.cx, o.cy, ship_hull(o.length, o.width), o.angle), fill=o.rgb)
    cabin = [(-0.38 * o.length, -0.28 * o.width), (-0.12 * o.length, -0.28 * o.width),
             (-0.12 * o.length, 0.28 * o.width), (-0.38 * o.length, 0.28 * o.width)]
    draw.polygon(rotate(o.cx, o.cy, cabin, o.angle), fill=_darker(o.rgb, 0.78))


def _draw_car(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
              water: np.ndarray) -> None:
    """A body with a windscreen, dark on light cars and light on dark ones."""
    draw.polygon(rotate(o.cx, o.cy, rect_points(o.length, o.width), o.angle), fill=o.rgb)
    glass = [(0.1 * o.length, -0.4 * o.width), (0.3 * o.length, -0.4 * o.width),
             (0.3 * o.length, 0.4 * o.width), (0.1 * o.length, 0.4 * o.width)]
    draw.polygon(rotate(o.cx, o.cy, glass, o.angle), fill=(45, 55, 70) if sum(o.rgb) > 200 else (90, 100, 115))


def _draw_tree(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
               water: np.ndarray) -> None:
    """A crown of three overlapping discs of slightly different shades."""
    r = o.length / 2
    for _ in range(3):
        dx, dy = rng.uniform(-0.3, 0.3, 2) * r
        rr = r * float(rng.uniform(0.55, 0.7))
        draw.ellipse((o.cx + dx - rr, o.cy + dy - rr, o.cx + dx + rr, o.cy + dy + rr),
                     fill=_darker(o.rgb, float(rng.uniform(0.85, 1.15))))


ObjectDrawer = Callable[[ImageDraw.ImageDraw, SceneObject, float, np.random.Generator, np.ndarray], None]

#: How each non-road class is drawn; every drawer gets (draw, object, scale, rng, water mask).
_OBJECT_DRAWERS: dict[str, ObjectDrawer] = {
    "building": _draw_building,
    "plane": _draw_plane,
    "storage_tank": _draw_storage_tank,
    "ship": _draw_ship,
    "car": _draw_car,
    "tree": _draw_tree,
}


def _draw_shadow(draw: ImageDraw.ImageDraw, o: SceneObject, k: float) -> None:
    """A dark copy of the object's footprint, offset towards the lower right (sun in the upper left)."""
    d = _SHADOW_OFFSET[o.cls] * k
    if d <= 0:
        return
    if o.cls in ("storage_tank", "tree"):
        r = o.length / 2
        draw.ellipse((o.cx - r + d, o.cy - r + d, o.cx + r + d, o.cy + r + d), fill=_SHADOW)
    elif o.cls == "plane":
        for part in plane_parts(o.length):
            draw.polygon(rotate(o.cx + d, o.cy + d, part, o.angle), fill=_SHADOW)
    else:
        draw.polygon(rotate(o.cx + d, o.cy + d, rect_points(o.length, o.width), o.angle), fill=_SHADOW)


# -- the whole image -------------------------------------------------------------------------


def _paint_textured_regions(arr: np.ndarray, scene: SceneDescription, rng: np.random.Generator
                            ) -> tuple[np.ndarray, np.ndarray | None, list[Region]]:
    """Paint water, fields, apron and clearing textures into ``arr``.

    Returns the water mask, the mask where forest canopy may grow (None: everywhere but water)
    and the flat regions (piers, markings) that are drawn later, over the canopy.
    """
    s = scene.size
    water = np.zeros((s, s), dtype=bool)
    flat_regions: list[Region] = []
    canopy_mask: np.ndarray | None = None
    for region in scene.regions:
        if region.kind in ("pier", "marking"):
            flat_regions.append(region)
            continue
        mask = polygon_mask(region.polygon, s)
        cover = "grass" if region.kind == "clearing" else region.kind
        arr[mask] = _texture(rng, cover, s)[mask]
        if region.kind == "water":
            water |= mask
        if region.kind == "clearing":
            canopy_mask = ~mask
    return water, canopy_mask, flat_regions


def _draw_flat_regions(draw: ImageDraw.ImageDraw, regions: list[Region], water: np.ndarray) -> None:
    """Piers (grey, removed from the water mask) and parking lines (white)."""
    for region in regions:
        fill = (150, 150, 146) if region.kind == "pier" else (225, 225, 220)
        draw.polygon(list(region.polygon), fill=fill)
        if region.kind == "pier":
            water &= ~polygon_mask(region.polygon, water.shape[0])


def _draw_roads(draw: ImageDraw.ImageDraw, scene: SceneDescription, water: np.ndarray, k: float) -> None:
    """Every road-like object; bridges and roads are removed from the water mask (no wakes over them)."""
    for o in scene.objects:
        if o.cls == "road":
            _draw_road(draw, o, k)
            water &= ~polygon_mask(rotate(o.cx, o.cy, rect_points(o.length, o.width), o.angle), scene.size)


def _with_sensor_noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``img`` plus faint Gaussian pixel noise, so flat areas are not perfectly uniform."""
    s = img.size[0]
    out = np.asarray(img, dtype=np.float32) + rng.normal(0, 2.5, (s, s, 3)).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def render_scene(scene: SceneDescription, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``scene.size``: land cover, regions, roads, objects."""
    k = scene.size / 128
    arr = _texture(rng, scene.background, scene.size)
    water, canopy_mask, flat_regions = _paint_textured_regions(arr, scene, rng)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if scene.background == "forest":
        _forest_canopy(img, rng, canopy_mask if canopy_mask is not None else ~water)
    draw = ImageDraw.Draw(img)
    _draw_flat_regions(draw, flat_regions, water)
    _draw_roads(draw, scene, water, k)
    others = [o for o in scene.objects if o.cls != "road"]
    for o in others:
        _draw_shadow(draw, o, k)
    for o in others:
        drawer = _OBJECT_DRAWERS.get(o.cls)
        if drawer is not None:
            drawer(draw, o, k, rng, water)
    return _with_sensor_noise(img, rng)
