"""Placing objects: the :class:`SceneBuilder` that the layouts use to fill a scene.

The builder keeps pixel masks of water, roads and occupied ground next to the scene it builds,
so that an object is only added where it really lies (a ship entirely on water, a car entirely on
a road, a house on free land clear of its neighbours). That is what makes the relation phrases
("floating on the water", "driving on the road") and the detection boxes true.

All randomness comes from the builder's generator, in a fixed call order: changing the order of
the calls changes every image after it.
"""

from __future__ import annotations

import numpy as np

from rsitr.data.synth.geometry import Point, bounding_box, outline, polygon_mask, rect_points, rotate
from rsitr.data.synth.scene import PALETTES, Region, SceneDescription, SceneObject

#: Object lengths in pixels at 128 px, per size category (scaled with the image size).
SIZE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "building": {"small": (8, 11), "medium": (12, 17), "large": (20, 28)},
    "plane": {"small": (14, 18), "medium": (20, 25), "large": (28, 36)},
    "storage_tank": {"small": (8, 10), "medium": (12, 15), "large": (18, 23)},
    "ship": {"small": (10, 14), "medium": (16, 21), "large": (24, 32)},
    "car": {"medium": (6, 7)},
    "tree": {"small": (5, 7), "medium": (8, 10), "large": (11, 14)},
}

#: Width/length ratio range per class; classes not listed are round or square (ratio 1).
_ASPECT_RANGES: dict[str, tuple[float, float]] = {"building": (0.55, 0.95), "ship": (0.24, 0.32), "car": (0.45, 0.55)}


class SceneBuilder:
    """Accumulates a scene while keeping masks of water, roads and occupied pixels for placement.

    Attributes:
        rng: the scene's random stream.
        size: image side in pixels.
        scale: ``size / 128``; every length in the layouts is given at 128 px and multiplied by it.
        scene: the description being built.
    """

    def __init__(self, rng: np.random.Generator, size: int, scene_type: str, background: str) -> None:
        self.rng = rng
        self.size = size
        self.scale = size / 128.0
        self.scene = SceneDescription(scene_type=scene_type, background=background, size=size)
        self.water = np.zeros((size, size), dtype=bool)
        self.blocked = np.zeros((size, size), dtype=bool)  # roads, piers: no land objects here
        self.road = np.zeros((size, size), dtype=bool)  # drivable surface: cars may go here
        self.occupied = np.zeros((size, size), dtype=bool)

    # -- random attributes ----------------------------------------------------------------

    def uniform(self, lo: float, hi: float) -> float:
        """A uniform float in [lo, hi), as a plain Python float."""
        return float(self.rng.uniform(lo, hi))

    def length_for(self, cls: str, size: str) -> float:
        """A random length of class ``cls`` in size category ``size``, in pixels."""
        lo, hi = SIZE_RANGES[cls][size]
        return float(self.rng.uniform(lo, hi)) * self.scale

    def pick_size(self, cls: str) -> str:
        """A random size category of ``cls``."""
        sizes = list(SIZE_RANGES[cls])
        return sizes[int(self.rng.integers(len(sizes)))]

    def pick_colour(self, cls: str, choices: tuple[str, ...] | None = None) -> str:
        """A random colour name of ``cls`` (from ``choices`` if given)."""
        names = list(choices or PALETTES[cls])
        return names[int(self.rng.integers(len(names)))]

    def aspect(self, cls: str) -> float:
        """Random width/length ratio of a class."""
        lo, hi = _ASPECT_RANGES.get(cls, (1.0, 1.0))
        return float(self.rng.uniform(lo, hi))

    def group_attrs(self, cls: str, colours: tuple[str, ...] | None = None,
                    p_same_colour: float = 0.7, p_same_size: float = 0.7) -> tuple[str | None, str | None]:
        """A shared colour and size for a group, each with some probability (None = per object).

        A shared attribute lets captions say "three white planes"; a mixed group is described by
        colour groups or "of different colours" instead.
        """
        colour = self.pick_colour(cls, colours) if self.rng.random() < p_same_colour else None
        size = self.pick_size(cls) if self.rng.random() < p_same_size else None
        return colour, size

    def make(self, cls: str, kind: str, colour: str, size: str, cx: float, cy: float,
             length: float, width: float, angle: float = 0.0) -> SceneObject:
        """Build an object with a jittered RGB and its box (not yet added)."""
        base = np.array(PALETTES[cls][colour], dtype=np.int64)
        # A shared brightness shift plus a small per-channel one, so white stays white, not pastel.
        shift = self.rng.integers(-10, 11) + self.rng.integers(-3, 4, size=3)
        rgb = np.clip(base + shift, 0, 255)
        box = bounding_box(outline(cls, cx, cy, length, width, angle), self.size)
        return SceneObject(cls, kind, colour, size, float(cx), float(cy), float(length), float(width),
                           float(angle), (int(rgb[0]), int(rgb[1]), int(rgb[2])), box)

    # -- regions and roads ----------------------------------------------------------------

    def add_region(self, kind: str, colour: str, polygon: list[Point]) -> None:
        """Add a layout region; water and piers update the placement masks."""
        self.scene.regions.append(Region(kind, colour, tuple((float(x), float(y)) for x, y in polygon)))
        if kind == "water":
            self.water |= polygon_mask(polygon, self.size)
        elif kind == "pier":
            mask = polygon_mask(polygon, self.size)
            self.water &= ~mask
            self.blocked |= mask

    def add_road(self, kind: str, colour: str, cx: float, cy: float, length: float, width: float,
                 angle: float) -> SceneObject:
        """Add a road-like object (road, street, runway, bridge) unconditionally."""
        obj = self.make("road", kind, colour, "large", cx, cy, length, width, angle)
        self.scene.objects.append(obj)
        mask = polygon_mask(rotate(cx, cy, rect_points(length, width), angle), self.size)
        self.blocked |= mask
        self.road |= mask
        if kind == "bridge":
            self.water &= ~mask
        return obj

    def straight_road(self, kind: str, colour: str, width: float, horizontal: bool, pos: float) -> SceneObject:
        """A road crossing the whole image horizontally (at y=pos) or vertically (at x=pos).

        The first non-bridge road of a scene also becomes a feature phrase ("a street running from
        left to right").
        """
        if kind != "bridge" and self.scene.count("road") == 0:
            direction = "from left to right" if horizontal else "from top to bottom"
            self.scene.features.append(f"a {kind} running {direction}")
        if horizontal:
            return self.add_road(kind, colour, self.size / 2, pos, self.size * 1.2, width, 0.0)
        return self.add_road(kind, colour, pos, self.size / 2, self.size * 1.2, width, 90.0)

    # -- objects --------------------------------------------------------------------------

    def try_add(self, obj: SceneObject, where: str = "land", gap: float = 1.0) -> bool:
        """Add ``obj`` if it lies fully inside the image, on allowed ground and clear of others.

        ``where`` is "land" (no water, no road), "water" (entirely on water) or "road" (entirely on
        a road surface). ``gap`` is the free margin, in pixels, kept around the object.
        """
        if not self._inside_image(obj) or not self._on_allowed_ground(obj, where):
            return False
        if not self._clear_of_others(obj, gap):
            return False
        x1, y1, x2, y2 = obj.box
        self.occupied[y1:y2, x1:x2] = True
        self.scene.objects.append(obj)
        return True

    def _inside_image(self, obj: SceneObject) -> bool:
        """Whether the whole outline is at least a pixel inside the border and the box is not degenerate."""
        pts = outline(obj.cls, obj.cx, obj.cy, obj.length, obj.width, obj.angle)
        if min(p[0] for p in pts) < 1 or min(p[1] for p in pts) < 1:
            return False
        if max(p[0] for p in pts) > self.size - 1 or max(p[1] for p in pts) > self.size - 1:
            return False
        x1, y1, x2, y2 = obj.box
        return x2 - x1 >= 2 and y2 - y1 >= 2

    def _on_allowed_ground(self, obj: SceneObject, where: str) -> bool:
        """Whether the object's box is on the ground ``where`` asks for (see :meth:`try_add`)."""
        x1, y1, x2, y2 = obj.box
        area = (slice(y1, y2), slice(x1, x2))
        if where == "land":
            return not (self.water[area].any() or self.blocked[area].any())
        if where == "water":
            return bool(self.water[area].all())
        if where == "road":
            return bool(self.road[area].all())
        return True

    def _clear_of_others(self, obj: SceneObject, gap: float) -> bool:
        """Whether the box grown by ``gap`` pixels touches no already placed object."""
        x1, y1, x2, y2 = obj.box
        g = max(0, int(round(gap)))
        return not self.occupied[max(0, y1 - g):y2 + g, max(0, x1 - g):x2 + g].any()

    def scatter(self, cls: str, kind: str, n: int, where: str = "land", colour: str | None = None,
                size: str | None = None, colours: tuple[str, ...] | None = None,
                angle_step: float | None = 90.0, gap: float = 1.0, tries: int = 40) -> int:
        """Place up to ``n`` objects at random positions; returns how many were placed.

        ``colour``/``size`` fix the attribute for the whole group; otherwise each object draws its
        own from ``colours`` (or the class palette) and the class sizes. ``angle_step`` None means
        any orientation, otherwise a multiple of ``angle_step`` degrees. Each object gets ``tries``
        random attempts, so a crowded scene simply ends up with fewer objects.
        """
        placed = 0
        for _ in range(n):
            for _ in range(tries):
                sz = size or self.pick_size(cls)
                col = colour or self.pick_colour(cls, colours)
                length = self.length_for(cls, sz)
                width = length * self.aspect(cls)
                angle = self._random_angle(angle_step)
                cx, cy = self.rng.uniform(0, self.size, size=2)
                if self.try_add(self.make(cls, kind, col, sz, cx, cy, length, width, angle), where, gap):
                    placed += 1
                    break
        return placed

    def _random_angle(self, step: float | None) -> float:
        """Any angle in [0, 360) if ``step`` is None, else a random multiple of ``step`` degrees."""
        if step is None:
            return float(self.rng.uniform(0, 360))
        return float(self.rng.integers(0, int(360 // step))) * step

    def relate(self, cls: str, phrase: str) -> None:
        """Record a relation phrase, but only if at least one object of ``cls`` exists."""
        if self.scene.count(cls) > 0:
            self.scene.relations.append((cls, phrase))
