"""The built-in synthetic dataset: procedurally drawn aerial scenes with captions and boxes.

``rsitr`` ships no real imagery, yet the demo must train a retrieval model end to end and every
test needs a dataset on disk. :func:`generate_synthetic` draws one: top-down, aerial-style scenes
(airports, harbors, parking lots, farmland ...) made only with numpy and ``PIL.ImageDraw``, five
captions per image generated from the same scene description (so every count, colour, size and
relation they state is true), and the exact object boxes as a detections file.

Generation runs in three stages per image, each with its own random stream derived from
``(seed, index)``:

1. :func:`make_scene` samples a :class:`SceneDescription` (scene type, land cover, regions such as
   water or fields, and objects with class, colour, size, position and box);
2. :func:`render_scene` draws it;
3. :func:`make_captions` writes the captions.

Because each image has its own streams, image ``i`` is identical whether 10 or 1000 images are
generated, and the same seed always gives byte-identical files.

Files written into ``out_dir``::

    images/synth_00000.png ...
    dataset_synth.json   Karpathy layout: {"images": [{"filename", "imgid", "split",
                         "sentences": [{"raw", "tokens", "sentid"}], "sentids", "label"}], ...}
    detections.json      {"format": "rsitr-detections-v1",
                          "images": {"synth_00000.png": {"boxes", "scores", "labels"}}}

Detections are the ground-truth boxes ``[x1, y1, x2, y2]`` in pixels of the written image (integer,
``x2``/``y2`` exclusive). Their scores are ``1 - 0.001 * rank``: all near 1 (they are ground
truth) but distinct, so that "top-k boxes by score" is well defined. The rank orders objects by
decreasing box area (ties by drawing order), with roads and runways last because they span the
image; boxes are listed in that order.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from rsitr.data.dataset import RetrievalDataset
from rsitr.errors import ConfigError
from rsitr.io import atomic_path, write_json

#: Scene classes, also the ``label`` of each image in the Karpathy json.
SCENE_TYPES: tuple[str, ...] = (
    "airport",
    "harbor",
    "residential",
    "parking",
    "farmland",
    "forest",
    "storage",
    "desert",
    "river",
    "industrial",
)

#: Object classes that can appear in a scene; the ``labels`` of the detections file.
OBJECT_CLASSES: tuple[str, ...] = ("building", "road", "plane", "storage_tank", "ship", "car", "tree")

#: Land-cover backgrounds a scene is drawn on.
BACKGROUNDS: tuple[str, ...] = ("grass", "sand", "forest", "soil", "urban")

#: Singular and plural nouns the captions use for each class (tests parse captions with these).
CLASS_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "building": (("building", "buildings"), ("house", "houses"), ("warehouse", "warehouses")),
    "road": (("road", "roads"), ("street", "streets")),
    "plane": (("plane", "planes"), ("airplane", "airplanes"), ("aircraft", "aircraft")),
    "storage_tank": (("storage tank", "storage tanks"), ("oil tank", "oil tanks"), ("tank", "tanks")),
    "ship": (("ship", "ships"), ("boat", "boats"), ("vessel", "vessels")),
    "car": (("car", "cars"), ("vehicle", "vehicles")),
    "tree": (("tree", "trees"),),
}

#: Number words used for exact counts; larger groups are described as "many".
NUMBER_WORDS: dict[int, str] = {
    2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
}

#: Colour name -> RGB, per class. Captions name the colour, the image uses the RGB (with jitter).
PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "building": {
        "red": (165, 62, 50), "grey": (150, 150, 148), "brown": (125, 85, 55),
        "blue": (70, 95, 150), "white": (228, 228, 222), "orange": (205, 125, 60),
    },
    "plane": {"white": (240, 240, 240), "grey": (168, 170, 175)},
    "storage_tank": {"white": (235, 235, 230), "grey": (185, 185, 182)},
    "ship": {"white": (238, 238, 238), "grey": (150, 150, 155), "red": (180, 55, 45), "orange": (220, 135, 50)},
    "car": {
        "white": (235, 235, 235), "black": (30, 30, 32), "red": (190, 40, 40),
        "blue": (45, 70, 170), "grey": (150, 150, 150), "yellow": (230, 205, 50),
    },
    "tree": {"green": (48, 105, 42), "dark green": (30, 75, 30), "light green": (95, 150, 60)},
    "road": {"grey": (95, 95, 95), "dark grey": (78, 78, 80), "brown": (165, 140, 100), "light grey": (135, 135, 132)},
}

#: Base RGB of each land cover and region texture.
_COVER_RGB: dict[str, tuple[float, float, float]] = {
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

# Object lengths in pixels at 128 px, per size category (scaled with the image size).
_SIZE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "building": {"small": (8, 11), "medium": (12, 17), "large": (20, 28)},
    "plane": {"small": (14, 18), "medium": (20, 25), "large": (28, 36)},
    "storage_tank": {"small": (8, 10), "medium": (12, 15), "large": (18, 23)},
    "ship": {"small": (10, 14), "medium": (16, 21), "large": (24, 32)},
    "car": {"medium": (6, 7)},
    "tree": {"small": (5, 7), "medium": (8, 10), "large": (11, 14)},
}

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_MANY_WORDS = ("many", "lots of", "a large number of", "plenty of")


@dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    Attributes:
        cls: object class, one of ``OBJECT_CLASSES``.
        kind: finer kind used for drawing and wording ("runway", "street", "bridge", "house" ...).
        colour: colour name as used in captions (a key of ``PALETTES[cls]``).
        size: "small", "medium" or "large" (relative to other objects of the class).
        cx, cy: centre in pixels.
        length, width: extent along and across the object's main axis, in pixels.
        angle: orientation of the main axis in degrees (counter-clockwise in image coordinates).
        rgb: the colour actually drawn.
        box: tight integer box ``(x1, y1, x2, y2)``, clipped to the image, ``x2``/``y2`` exclusive.
    """

    cls: str
    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    length: float
    width: float
    angle: float
    rgb: tuple[int, int, int]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Region:
    """A non-object area drawn under the objects: water, a crop field, an apron, a pier, a marking."""

    kind: str
    colour: str
    polygon: tuple[tuple[float, float], ...]


@dataclass
class SceneDescription:
    """Everything an image shows; both the renderer and the caption writer read only this.

    Attributes:
        scene_type: one of ``SCENE_TYPES``.
        background: land cover, one of ``BACKGROUNDS``.
        size: image side in pixels.
        regions: layout areas drawn over the background, in drawing order.
        objects: objects in drawing order (roads first).
        relations: ``(class, participle phrase)`` pairs true of *every* object of that class,
            e.g. ``("plane", "parked near the runway")``.
        features: noun phrases of true layout facts, e.g. "a long runway", "two piers".
    """

    scene_type: str
    background: str
    size: int
    regions: list[Region] = field(default_factory=list)
    objects: list[SceneObject] = field(default_factory=list)
    relations: list[tuple[str, str]] = field(default_factory=list)
    features: list[str] = field(default_factory=list)

    def objects_of(self, cls: str, colour: str | None = None, size: str | None = None) -> list[SceneObject]:
        """Objects of class ``cls``, optionally only those of a colour and/or size."""
        return [
            o for o in self.objects
            if o.cls == cls and (colour is None or o.colour == colour) and (size is None or o.size == size)
        ]

    def count(self, cls: str, colour: str | None = None, size: str | None = None) -> int:
        """Number of objects of class ``cls`` (optionally of a colour and/or size)."""
        return len(self.objects_of(cls, colour, size))

    def relations_of(self, cls: str) -> list[str]:
        """Relation phrases that hold for every object of class ``cls``."""
        return [phrase for c, phrase in self.relations if c == cls]


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _rotate(cx: float, cy: float, points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    """Rotate object-frame points (x along the main axis) by ``angle`` degrees and move to (cx, cy)."""
    a = math.radians(angle)
    c, s = math.cos(a), math.sin(a)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _rect_points(length: float, width: float) -> list[tuple[float, float]]:
    """Corners of a length x width rectangle centred at the origin."""
    hl, hw = length / 2, width / 2
    return [(-hl, -hw), (hl, -hw), (hl, hw), (-hl, hw)]


def _plane_parts(length: float) -> list[list[tuple[float, float]]]:
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


def _ship_hull(length: float, width: float) -> list[tuple[float, float]]:
    """Hull outline of a ship with a pointed bow along +x."""
    hl, hw = length / 2, width / 2
    return [(hl, 0.0), (0.25 * length, -hw), (-hl, -hw * 0.85), (-hl, hw * 0.85), (0.25 * length, hw)]


def _outline(cls: str, cx: float, cy: float, length: float, width: float, angle: float) -> list[tuple[float, float]]:
    """Image-frame points whose bounding box is the object's box."""
    if cls in ("storage_tank", "tree"):
        r = length / 2
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if cls == "plane":
        return [p for part in _plane_parts(length) for p in _rotate(cx, cy, part, angle)]
    if cls == "ship":
        return _rotate(cx, cy, _ship_hull(length, width), angle)
    return _rotate(cx, cy, _rect_points(length, width), angle)


def _box(points: list[tuple[float, float]], size: int) -> tuple[int, int, int, int]:
    """Integer box enclosing ``points``, clipped to the image."""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x1 = max(0, math.floor(min(xs)))
    y1 = max(0, math.floor(min(ys)))
    x2 = min(size, math.ceil(max(xs)))
    y2 = min(size, math.ceil(max(ys)))
    return (x1, y1, x2, y2)


def _polygon_mask(polygon: list[tuple[float, float]] | tuple[tuple[float, float], ...], size: int) -> np.ndarray:
    """Boolean mask of a filled polygon."""
    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).polygon(list(polygon), fill=1)
    return np.asarray(img, dtype=bool)


# --------------------------------------------------------------------------------------------
# Scene sampling
# --------------------------------------------------------------------------------------------


class _Builder:
    """Accumulates a scene while keeping masks of water, roads and occupied pixels for placement."""

    def __init__(self, rng: np.random.Generator, size: int, scene_type: str, background: str) -> None:
        self.rng = rng
        self.s = size
        self.k = size / 128.0
        self.scene = SceneDescription(scene_type=scene_type, background=background, size=size)
        self.water = np.zeros((size, size), dtype=bool)
        self.blocked = np.zeros((size, size), dtype=bool)  # roads, piers: no land objects here
        self.road = np.zeros((size, size), dtype=bool)  # drivable surface: cars may go here
        self.occupied = np.zeros((size, size), dtype=bool)

    # -- primitives -----------------------------------------------------------------------

    def length_for(self, cls: str, size: str) -> float:
        """A random length of class ``cls`` in size category ``size``, in pixels."""
        lo, hi = _SIZE_RANGES[cls][size]
        return float(self.rng.uniform(lo, hi)) * self.k

    def pick_size(self, cls: str) -> str:
        """A random size category of ``cls``."""
        sizes = list(_SIZE_RANGES[cls])
        return sizes[int(self.rng.integers(len(sizes)))]

    def pick_colour(self, cls: str, choices: tuple[str, ...] | None = None) -> str:
        """A random colour name of ``cls`` (from ``choices`` if given)."""
        names = list(choices or PALETTES[cls])
        return names[int(self.rng.integers(len(names)))]

    def make(self, cls: str, kind: str, colour: str, size: str, cx: float, cy: float,
             length: float, width: float, angle: float = 0.0) -> SceneObject:
        """Build an object with a jittered RGB and its box (not yet added)."""
        base = np.array(PALETTES[cls][colour], dtype=np.int64)
        # A shared brightness shift plus a small per-channel one, so white stays white, not pastel.
        shift = self.rng.integers(-10, 11) + self.rng.integers(-3, 4, size=3)
        rgb = np.clip(base + shift, 0, 255)
        box = _box(_outline(cls, cx, cy, length, width, angle), self.s)
        return SceneObject(cls, kind, colour, size, float(cx), float(cy), float(length), float(width),
                           float(angle), (int(rgb[0]), int(rgb[1]), int(rgb[2])), box)

    def add_region(self, kind: str, colour: str, polygon: list[tuple[float, float]]) -> None:
        """Add a layout region; water and piers update the placement masks."""
        self.scene.regions.append(Region(kind, colour, tuple((float(x), float(y)) for x, y in polygon)))
        if kind == "water":
            self.water |= _polygon_mask(polygon, self.s)
        elif kind == "pier":
            mask = _polygon_mask(polygon, self.s)
            self.water &= ~mask
            self.blocked |= mask

    def add_road(self, kind: str, colour: str, cx: float, cy: float, length: float, width: float,
                 angle: float) -> SceneObject:
        """Add a road-like object (road, street, runway, bridge) unconditionally."""
        obj = self.make("road", kind, colour, "large", cx, cy, length, width, angle)
        self.scene.objects.append(obj)
        mask = _polygon_mask(_rotate(cx, cy, _rect_points(length, width), angle), self.s)
        self.blocked |= mask
        self.road |= mask
        if kind == "bridge":
            self.water &= ~mask
        return obj

    def try_add(self, obj: SceneObject, where: str = "land", gap: float = 1.0) -> bool:
        """Add ``obj`` if it lies fully inside the image, on allowed ground and clear of others.

        ``where`` is "land" (no water, no road), "water" (entirely on water) or "road" (entirely on
        a road surface). ``gap`` is the free margin, in pixels, kept around the object.
        """
        x1, y1, x2, y2 = obj.box
        pts = _outline(obj.cls, obj.cx, obj.cy, obj.length, obj.width, obj.angle)
        if min(p[0] for p in pts) < 1 or min(p[1] for p in pts) < 1:
            return False
        if max(p[0] for p in pts) > self.s - 1 or max(p[1] for p in pts) > self.s - 1:
            return False
        if x2 - x1 < 2 or y2 - y1 < 2:
            return False
        area = (slice(y1, y2), slice(x1, x2))
        if where == "land" and (self.water[area].any() or self.blocked[area].any()):
            return False
        if where == "water" and not self.water[area].all():
            return False
        if where == "road" and not self.road[area].all():
            return False
        g = max(0, int(round(gap)))
        padded = (slice(max(0, y1 - g), y2 + g), slice(max(0, x1 - g), x2 + g))
        if self.occupied[padded].any():
            return False
        self.occupied[area] = True
        self.scene.objects.append(obj)
        return True

    def scatter(self, cls: str, kind: str, n: int, where: str = "land", colour: str | None = None,
                size: str | None = None, colours: tuple[str, ...] | None = None,
                angle_step: float | None = 90.0, gap: float = 1.0, tries: int = 40) -> int:
        """Place up to ``n`` objects at random positions; returns how many were placed.

        ``colour``/``size`` fix the attribute for the whole group; otherwise each object draws its
        own from ``colours`` (or the class palette) and the class sizes.
        """
        placed = 0
        for _ in range(n):
            for _ in range(tries):
                sz = size or self.pick_size(cls)
                col = colour or self.pick_colour(cls, colours)
                length = self.length_for(cls, sz)
                width = length * self._aspect(cls)
                if angle_step is None:
                    angle = float(self.rng.uniform(0, 360))
                else:
                    angle = float(self.rng.integers(0, int(360 // angle_step))) * angle_step
                cx, cy = self.rng.uniform(0, self.s, size=2)
                if self.try_add(self.make(cls, kind, col, sz, cx, cy, length, width, angle), where, gap):
                    placed += 1
                    break
        return placed

    def _aspect(self, cls: str) -> float:
        """Random width/length ratio of a class."""
        lo, hi = {"building": (0.55, 0.95), "ship": (0.24, 0.32), "car": (0.45, 0.55)}.get(cls, (1.0, 1.0))
        return float(self.rng.uniform(lo, hi))

    def group_attrs(self, cls: str, colours: tuple[str, ...] | None = None,
                    p_same_colour: float = 0.7, p_same_size: float = 0.7) -> tuple[str | None, str | None]:
        """A shared colour and size for a group, each with some probability (None = per object)."""
        colour = self.pick_colour(cls, colours) if self.rng.random() < p_same_colour else None
        size = self.pick_size(cls) if self.rng.random() < p_same_size else None
        return colour, size

    def relate(self, cls: str, phrase: str) -> None:
        """Record a relation phrase, but only if at least one object of ``cls`` exists."""
        if self.scene.count(cls) > 0:
            self.scene.relations.append((cls, phrase))

    def straight_road(self, kind: str, colour: str, width: float, horizontal: bool, pos: float) -> SceneObject:
        """A road crossing the whole image horizontally (at y=pos) or vertically (at x=pos)."""
        if kind != "bridge" and self.scene.count("road") == 0:
            self.scene.features.append(f"a {kind} running {'from left to right' if horizontal else 'from top to bottom'}")
        if horizontal:
            return self.add_road(kind, colour, self.s / 2, pos, self.s * 1.2, width, 0.0)
        return self.add_road(kind, colour, pos, self.s / 2, self.s * 1.2, width, 90.0)

    def uniform(self, lo: float, hi: float) -> float:
        """A uniform float in [lo, hi), as a plain Python float."""
        return float(self.rng.uniform(lo, hi))


def _count_words(n: int) -> str:
    """'a' / number word for small counts, used in feature phrases."""
    return "a" if n == 1 else NUMBER_WORDS.get(n, "many")


def _scene_airport(b: _Builder) -> None:
    s, k = b.s, b.k
    horizontal = bool(b.rng.random() < 0.5)
    width = b.uniform(13, 18) * k
    near_start = bool(b.rng.random() < 0.5)
    pos = b.uniform(0.14, 0.22) * s if near_start else b.uniform(0.78, 0.86) * s
    # The apron: paved area on the far side of the runway.
    edge = pos + (width / 2 + 3 * k) * (1 if near_start else -1)
    far = s if near_start else 0
    if horizontal:
        apron = [(0, edge), (s, edge), (s, far), (0, far)]
    else:
        apron = [(edge, 0), (edge, s), (far, s), (far, 0)]
    if b.scene.background == "grass":
        b.add_region("apron", "grey", apron)
    b.straight_road("runway", "dark grey", width, horizontal, pos)
    b.scene.features.append(str(b.rng.choice(["a long runway", "a runway with white markings", "a straight runway"])))
    if b.rng.random() < 0.5:
        b.scatter("building", "terminal", 1, colour=b.pick_colour("building", ("white", "grey", "blue")),
                  size="large", gap=3 * k)
    colour, size = b.group_attrs("plane", p_same_colour=0.75, p_same_size=0.6)
    b.scatter("plane", "airliner", int(b.rng.integers(1, 7)), colour=colour, size=size,
              angle_step=45.0, gap=2 * k)
    b.relate("plane", "parked near the runway")
    b.relate("plane", "parked on the apron")
    if b.scene.count("building"):
        b.relate("plane", "near the terminal building")


def _scene_harbor(b: _Builder) -> None:
    s, k = b.s, b.k
    side = int(b.rng.integers(4))  # 0 top, 1 right, 2 bottom, 3 left: where the water is
    depth = b.uniform(0.5, 0.62) * s
    n = 6
    jag = [b.uniform(-3, 3) * k for _ in range(n + 1)]
    along = [i * s / n for i in range(n + 1)]
    if side == 0:
        poly = [(a, depth + j) for a, j in zip(along, jag)] + [(s, 0), (0, 0)]
    elif side == 2:
        poly = [(a, s - depth + j) for a, j in zip(along, jag)] + [(s, s), (0, s)]
    elif side == 3:
        poly = [(depth + j, a) for a, j in zip(along, jag)] + [(0, s), (0, 0)]
    else:
        poly = [(s - depth + j, a) for a, j in zip(along, jag)] + [(s, s), (s, 0)]
    b.add_region("water", "blue", poly)
    piers = int(b.rng.integers(0, 3))
    for i in range(piers):
        a = (i + 1) * s / (piers + 1) + b.uniform(-6, 6) * k
        plen = b.uniform(0.25, 0.38) * s
        pw = b.uniform(3, 4.5) * k
        shore = depth if side in (0, 3) else s - depth
        into = -1 if side in (0, 3) else 1
        y0, y1 = shore - into * 3 * k, shore + into * plen
        if side in (0, 2):
            rect = [(a - pw / 2, y0), (a + pw / 2, y0), (a + pw / 2, y1), (a - pw / 2, y1)]
        else:
            rect = [(y0, a - pw / 2), (y0, a + pw / 2), (y1, a + pw / 2), (y1, a - pw / 2)]
        b.add_region("pier", "grey", rect)
    if piers:
        b.scene.features.append(f"{_count_words(piers)} {'pier' if piers == 1 else 'piers'}")
    b.scene.features.append(str(b.rng.choice(["blue water", "calm water", "a shoreline"])))
    colour, size = b.group_attrs("ship", p_same_colour=0.55, p_same_size=0.5)
    b.scatter("ship", "ship", int(b.rng.integers(1, 7)), where="water", colour=colour, size=size,
              angle_step=None if b.rng.random() < 0.4 else 180.0, gap=2 * k)
    b.relate("ship", "floating on the water")
    b.relate("ship", "on the blue water")
    if b.rng.random() < 0.7:
        colour, size = b.group_attrs("building", ("grey", "white", "blue", "red"))
        b.scatter("building", "warehouse", int(b.rng.integers(1, 5)), colour=colour, size=size, gap=2 * k)
        b.relate("building", "standing on the shore")
    if b.rng.random() < 0.3:
        b.scatter("storage_tank", "tank", int(b.rng.integers(1, 4)), colour="white", gap=2 * k)


def _scene_residential(b: _Builder) -> None:
    s, k = b.s, b.k
    roads: list[tuple[bool, float]] = []
    first_h = bool(b.rng.random() < 0.5)
    roads.append((first_h, b.uniform(0.35, 0.65) * s))
    if b.rng.random() < 0.45:
        roads.append((not first_h, b.uniform(0.3, 0.7) * s))
    rw = b.uniform(6, 8) * k
    for horizontal, pos in roads:
        b.straight_road("street", "grey", rw, horizontal, pos)
    if len(roads) == 2:
        b.scene.features.append(str(b.rng.choice(["two roads crossing each other", "a crossroads"])))
    else:
        b.scene.features.append(str(b.rng.choice(["a straight road", "a street"])))
    colour, size = b.group_attrs("building", ("red", "grey", "brown", "orange", "white"), 0.6, 0.6)
    target = int(b.rng.integers(3, 11))
    placed = 0
    # Houses in rows on both sides of each road, so "beside the road" is true of every one.
    for horizontal, pos in roads:
        for sign in (-1, 1):
            t = b.uniform(4, 12) * k
            while t < s - 6 * k and placed < target:
                sz = size or b.pick_size("building")
                col = colour or b.pick_colour("building", ("red", "grey", "brown", "orange", "white"))
                length = b.length_for("building", sz)
                width = length * b.uniform(0.6, 0.9)
                off = pos + sign * (rw / 2 + 2.5 * k + width / 2)
                cx, cy = (t + length / 2, off) if horizontal else (off, t + length / 2)
                ang = 0.0 if horizontal else 90.0
                if b.rng.random() < 0.8 and b.try_add(b.make("building", "house", col, sz, cx, cy, length, width, ang),
                                                       gap=1.5 * k):
                    placed += 1
                t += length + b.uniform(3, 8) * k
    b.relate("building", "beside the road")
    b.relate("building", "lined along the street")
    n_trees = b.scatter("tree", "tree", int(b.rng.integers(0, 9)), colour="green", gap=1)
    if n_trees >= 4:
        b.relate("building", "surrounded by trees")
    if b.rng.random() < 0.5:
        b.scatter("car", "car", int(b.rng.integers(1, 4)), where="road", angle_step=90.0, gap=2 * k)
        b.relate("car", "driving on the road")


def _scene_parking(b: _Builder) -> None:
    s, k = b.s, b.k
    rw = b.uniform(8, 11) * k
    road_y = b.uniform(0.08, 0.14) * s if b.rng.random() < 0.5 else b.uniform(0.86, 0.92) * s
    b.straight_road("road", "grey", rw, True, road_y)
    rows = int(b.rng.integers(2, 5))
    top = road_y + rw / 2 + 5 * k if road_y < s / 2 else 5 * k
    bottom = s - 5 * k if road_y < s / 2 else road_y - rw / 2 - 5 * k
    row_h = (bottom - top) / rows
    slot = b.uniform(5.5, 6.5) * k
    x0 = b.uniform(6, 16) * k
    x_end = s - b.uniform(6, 30) * k
    fill = b.uniform(0.55, 0.95)
    colours = tuple(b.rng.choice(list(PALETTES["car"]), size=int(b.rng.integers(2, 6)), replace=False).tolist())
    for r in range(rows):
        cy = top + (r + 0.5) * row_h
        # Parking-space markings: a white line between neighbouring slots.
        x = x0
        while x + slot <= x_end:
            line = [(x - 0.4 * k, cy - 4.5 * k), (x + 0.4 * k, cy - 4.5 * k), (x + 0.4 * k, cy + 4.5 * k), (x - 0.4 * k, cy + 4.5 * k)]
            b.add_region("marking", "white", line)
            if b.rng.random() < fill:
                length = b.length_for("car", "medium")
                col = b.pick_colour("car", colours)
                b.try_add(b.make("car", "car", col, "medium", x + slot / 2, cy, length, length * 0.5, 90.0), gap=0)
            x += slot
    if b.scene.count("car") == 0:
        b.try_add(b.make("car", "car", colours[0], "medium", x0 + slot / 2, top + 0.5 * row_h, 6.5 * k, 3.2 * k, 90.0), gap=0)
    b.relate("car", "parked in rows")
    b.relate("car", "in the parking lot")
    b.scene.features.append(str(b.rng.choice(["white parking lines", "rows of parking spaces", "a road along the parking lot"])))
    if b.rng.random() < 0.35:
        b.scatter("building", "building", 1, colour=b.pick_colour("building", ("grey", "white", "blue")), size="large", gap=2 * k)
    if b.rng.random() < 0.5:
        b.scatter("tree", "tree", int(b.rng.integers(1, 5)), colour="green", size="small", gap=1)


def _scene_farmland(b: _Builder) -> None:
    s, k = b.s, b.k
    cols = int(b.rng.integers(1, 4))
    rows = int(b.rng.integers(2, 4))
    xs = [0.0] + sorted(b.uniform(0.2, 0.8) * s for _ in range(cols - 1)) + [float(s)]
    ys = [0.0] + sorted(b.uniform(0.2, 0.8) * s for _ in range(rows - 1)) + [float(s)]
    field_colours: list[str] = []
    gap = 1.5 * k
    for i in range(cols):
        for j in range(rows):
            colour = str(b.rng.choice(["green", "yellow", "brown"], p=[0.45, 0.35, 0.2]))
            field_colours.append(colour)
            rect = [(xs[i] + gap, ys[j] + gap), (xs[i + 1] - gap, ys[j] + gap),
                    (xs[i + 1] - gap, ys[j + 1] - gap), (xs[i] + gap, ys[j + 1] - gap)]
            b.add_region(f"field_{colour}", colour, rect)
    present = sorted(set(field_colours), key=["green", "yellow", "brown"].index)
    n_fields = len(field_colours)
    b.scene.features.append(f"{NUMBER_WORDS.get(n_fields, 'many')} fields")
    if len(present) == 1:
        b.scene.features.append(f"{present[0]} fields")
    else:
        b.scene.features.append(" and ".join(present) + " fields")
    b.scene.features.append("rectangular fields")
    if b.rng.random() < 0.45:
        b.straight_road("dirt road", "brown", b.uniform(4, 6) * k, bool(b.rng.random() < 0.5), b.uniform(0.25, 0.75) * s)
        b.scene.features.append("a dirt road")
    if b.rng.random() < 0.5:
        b.scatter("building", "farmhouse", int(b.rng.integers(1, 3)), colour=b.pick_colour("building", ("red", "white", "grey")), gap=2 * k)
    n_trees = b.scatter("tree", "tree", int(b.rng.integers(0, 6)), colour="green", gap=1)
    if b.scene.count("building") + n_trees == 0:
        b.scatter("tree", "tree", 2, colour="green", gap=1, tries=200)
    b.relate("tree", "scattered among the fields")


def _scene_forest(b: _Builder) -> None:
    s, k = b.s, b.k
    if b.rng.random() < 0.4:
        b.straight_road("road", "brown", b.uniform(4, 6) * k, bool(b.rng.random() < 0.5), b.uniform(0.3, 0.7) * s)
        b.scene.features.append(str(b.rng.choice(["a narrow road", "a path through the trees"])))
    b.scene.features.append(str(b.rng.choice(["dense trees", "a thick green canopy", "dark green woods"])))
    if b.rng.random() < 0.3:
        cx, cy = b.uniform(0.25, 0.75) * s, b.uniform(0.25, 0.75) * s
        r = b.uniform(14, 20) * k
        clearing = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 12, endpoint=False)]
        b.add_region("clearing", "green", clearing)
        if b.try_add(b.make("building", "cabin", b.pick_colour("building", ("brown", "red", "grey")), "small", cx, cy,
                            9 * k, 6 * k, 0.0), gap=1):
            b.relate("building", "in a clearing")
    colour = str(b.rng.choice(["light green", "dark green"]))
    b.scatter("tree", "tree", int(b.rng.integers(3, 9)), colour=colour, size="large", gap=1)
    b.relate("tree", "growing densely")


def _scene_storage(b: _Builder) -> None:
    s, k = b.s, b.k
    horizontal = bool(b.rng.random() < 0.5)
    pos = b.uniform(0.08, 0.14) * s if b.rng.random() < 0.5 else b.uniform(0.86, 0.92) * s
    rw = b.uniform(6, 9) * k
    b.straight_road("road", "grey", rw, horizontal, pos)
    colour, size = b.group_attrs("storage_tank", p_same_colour=0.75, p_same_size=0.8)
    size_for_grid = size or "medium"
    diam = _SIZE_RANGES["storage_tank"][size_for_grid][1] * k
    step = diam * b.uniform(1.25, 1.5)
    rows = int(b.rng.integers(1, 4))
    cols = int(b.rng.integers(2, 5))
    # Fit the grid inside the area away from the road.
    lo = pos + rw / 2 + 3 * k if pos < s / 2 else 3 * k
    hi = s - 3 * k if pos < s / 2 else pos - rw / 2 - 3 * k
    along0 = b.uniform(4, 20) * k
    for r in range(rows):
        for c in range(cols):
            a = along0 + (c + 0.5) * step
            o = lo + (r + 0.5) * step
            if o + diam / 2 > hi:
                continue
            cx, cy = (a, o) if horizontal else (o, a)
            sz = size or b.pick_size("storage_tank")
            d = b.length_for("storage_tank", sz)
            d = min(d, diam)
            col = colour or b.pick_colour("storage_tank")
            b.try_add(b.make("storage_tank", "tank", col, sz, cx, cy, d, d), gap=0)
    if b.scene.count("storage_tank") == 0:
        b.scatter("storage_tank", "tank", 2, colour=colour, size=size, gap=1, tries=200)
    else:
        used_rows = len({round(o.cy if horizontal else o.cx) for o in b.scene.objects_of("storage_tank")})
        b.relate("storage_tank", "arranged in a row" if used_rows == 1 else "arranged in rows")
    if b.rng.random() < 0.5:
        n = b.scatter("building", "building", int(b.rng.integers(1, 4)),
                      colour=b.pick_colour("building", ("grey", "white", "blue")), gap=2 * k)
        if n:
            b.relate("storage_tank", "next to a building" if n == 1 else "next to some buildings")


def _scene_desert(b: _Builder) -> None:
    s, k = b.s, b.k
    b.scene.features.append(str(b.rng.choice(["sand dunes", "rippled sand", "dry yellow sand"])))
    has_road = bool(b.rng.random() < 0.5)
    if has_road:
        kind = str(b.rng.choice(["road", "dirt road"]))
        b.straight_road(kind, "grey" if kind == "road" else "brown", b.uniform(5, 7) * k,
                        bool(b.rng.random() < 0.5), b.uniform(0.25, 0.75) * s)
        b.scene.features.append(f"a {kind} crossing the desert")
        if b.rng.random() < 0.5:
            b.scatter("car", "car", int(b.rng.integers(1, 3)), where="road", gap=3 * k)
            b.relate("car", "driving on the road")
    if not has_road or b.rng.random() < 0.5:
        colour, size = b.group_attrs("building", ("white", "brown", "grey"), 0.8, 0.8)
        n = b.scatter("building", "building", int(b.rng.integers(1, 4)), colour=colour, size=size, gap=3 * k)
        if n == 0:
            b.scatter("building", "building", 1, colour=colour or "white", size="small", tries=200)
    if b.scene.count("building"):
        b.relate("building", "standing in the sand")


def _scene_river(b: _Builder) -> None:
    s, k = b.s, b.k
    horizontal = bool(b.rng.random() < 0.5)
    centre = b.uniform(0.38, 0.62) * s
    width = b.uniform(16, 26) * k
    amp = b.uniform(2, 9) * k
    phase = b.uniform(0, 2 * math.pi)
    steps = 16
    ts = [i * s / steps for i in range(steps + 1)]
    offs = [centre + amp * math.sin(phase + 2 * math.pi * t / s) for t in ts]
    side_a = [(t, o - width / 2) for t, o in zip(ts, offs)]
    side_b = [(t, o + width / 2) for t, o in zip(ts, offs)][::-1]
    poly = side_a + side_b
    if not horizontal:
        poly = [(y, x) for x, y in poly]
    b.add_region("water", "blue", poly)
    b.scene.features.append("a winding river" if amp > 5 * k else "a straight river")
    if b.rng.random() < 0.4:
        b.straight_road("bridge", "light grey", b.uniform(5, 7) * k, not horizontal, b.uniform(0.3, 0.7) * s)
        b.scene.features.append("a bridge over the river")
    if b.rng.random() < 0.6:
        colour, size = b.group_attrs("ship", p_same_colour=0.6)
        b.scatter("ship", "boat", int(b.rng.integers(1, 4)), where="water", colour=colour,
                  size=size if size != "large" else "small", angle_step=180.0 if horizontal else None, gap=2 * k)
        b.relate("ship", "sailing on the river")
    # Trees on the banks: sample near the river edge.
    n_target = int(b.rng.integers(2, 9))
    placed = 0
    for _ in range(n_target * 30):
        if placed >= n_target:
            break
        i = int(b.rng.integers(steps + 1))
        t, o = ts[i], offs[i]
        sign = -1 if b.rng.random() < 0.5 else 1
        d = b.length_for("tree", "medium")
        off = o + sign * (width / 2 + d / 2 + b.uniform(1, 4) * k)
        cx, cy = (t, off) if horizontal else (off, t)
        if b.try_add(b.make("tree", "tree", "green", "medium", cx, cy, d, d), gap=1):
            placed += 1
    if placed == 0:
        b.scatter("tree", "tree", 2, colour="green", size="medium", tries=200)
    b.relate("tree", "along the riverbank")


def _scene_industrial(b: _Builder) -> None:
    s, k = b.s, b.k
    h = bool(b.rng.random() < 0.5)
    b.straight_road("road", "grey", b.uniform(7, 9) * k, h, b.uniform(0.3, 0.7) * s)
    if b.rng.random() < 0.4:
        b.straight_road("road", "grey", b.uniform(6, 8) * k, not h, b.uniform(0.3, 0.7) * s)
        b.scene.features.append("two crossing roads")
    else:
        b.scene.features.append("a wide road")
    colour, _ = b.group_attrs("building", ("grey", "white", "blue"), 0.6, 0.0)
    n = b.scatter("building", "factory", int(b.rng.integers(2, 6)), colour=colour, size="large", gap=2 * k)
    if n == 0:
        b.scatter("building", "factory", 1, colour=colour or "grey", size="medium", tries=200)
    b.relate("building", "with flat roofs")
    if b.rng.random() < 0.5:
        b.scatter("storage_tank", "tank", int(b.rng.integers(1, 5)), colour=b.pick_colour("storage_tank"),
                  size=b.pick_size("storage_tank"), gap=1)
    if b.rng.random() < 0.5:
        b.scatter("car", "car", int(b.rng.integers(1, 7)), where="road", gap=2 * k)
        b.relate("car", "driving on the road")


_SCENE_BUILDERS = {
    "airport": (_scene_airport, ("grass", "urban")),
    "harbor": (_scene_harbor, ("urban", "soil")),
    "residential": (_scene_residential, ("grass",)),
    "parking": (_scene_parking, ("urban",)),
    "farmland": (_scene_farmland, ("soil",)),
    "forest": (_scene_forest, ("forest",)),
    "storage": (_scene_storage, ("soil", "urban")),
    "desert": (_scene_desert, ("sand",)),
    "river": (_scene_river, ("grass", "forest")),
    "industrial": (_scene_industrial, ("urban", "soil")),
}


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of image ``index``: independent of every other image."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def make_scene(seed: int, index: int, image_size: int = 128) -> SceneDescription:
    """Sample the scene description of image ``index`` for ``seed``.

    The scene type cycles through ``SCENE_TYPES`` in a seeded order per block of ten images, so
    every type is equally frequent and any ten consecutive images cover all types.
    """
    block = index // len(SCENE_TYPES)
    order = _rng(seed, block, 99).permutation(len(SCENE_TYPES))
    scene_type = SCENE_TYPES[int(order[index % len(SCENE_TYPES)])]
    rng = _rng(seed, index, 0)
    build, backgrounds = _SCENE_BUILDERS[scene_type]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    builder = _Builder(rng, image_size, scene_type, background)
    build(builder)
    _add_position_relations(builder.scene)
    return builder.scene


def _add_position_relations(scene: SceneDescription) -> None:
    """Add "located in the upper part of the image"-style relations where all objects of a class agree.

    Positions make captions of two scenes of the same type and counts differ, which is what a
    retrieval model needs to tell them apart.
    """
    half = scene.size / 2
    for cls in OBJECT_CLASSES:
        objs = scene.objects_of(cls)
        if cls == "road" or not objs:
            continue
        if all(o.cy < half for o in objs):
            scene.relations.append((cls, "located in the upper part of the image"))
        if all(o.cy > half for o in objs):
            scene.relations.append((cls, "located in the lower part of the image"))
        if all(o.cx < half for o in objs):
            scene.relations.append((cls, "located on the left side of the image"))
        if all(o.cx > half for o in objs):
            scene.relations.append((cls, "located on the right side of the image"))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in roughly [-2, 2]: a coarse Gaussian grid upsampled bilinearly."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _texture(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """A full-image float RGB texture of land cover ``kind`` (blotches, grain and patterns)."""
    base = np.array(_COVER_RGB[kind], dtype=np.float32) + rng.normal(0, 5, 3).astype(np.float32)
    amp, grain = {"grass": (10, 6), "sand": (8, 4), "forest": (8, 9), "soil": (12, 8), "urban": (7, 6),
                  "water": (6, 2.5), "apron": (5, 4)}.get(kind, (6, 5))
    low = _smooth_noise(rng, size, max(3, size // 16))[:, :, None]
    arr = base + amp * low + rng.normal(0, grain, (size, size, 1)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "sand":
        a = float(rng.uniform(0, math.pi))
        period = float(rng.uniform(10, 20)) * size / 128
        phase = (xx * math.cos(a) + yy * math.sin(a)) / period * 2 * math.pi
        arr += (14 * np.sin(phase + 1.5 * _smooth_noise(rng, size, 4)))[:, :, None]
    elif kind == "urban":
        blocks = np.asarray(Image.fromarray(rng.standard_normal((8, 8)).astype(np.float32)).resize(
            (size, size), Image.Resampling.NEAREST), dtype=np.float32)
        arr += 6 * blocks[:, :, None]
    elif kind.startswith("field_"):
        period = float(rng.uniform(3, 5)) * size / 128
        coord = xx if rng.random() < 0.5 else yy
        arr += (9 * np.sin(coord / period * 2 * math.pi))[:, :, None]
    elif kind == "grass":
        arr += (6 * _smooth_noise(rng, size, 5))[:, :, None] * np.array([1.0, 0.3, -0.5], dtype=np.float32)
    return arr


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


def _darker(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    """``rgb`` scaled by ``f`` (f < 1 darkens, > 1 lightens), clipped."""
    return tuple(int(max(0, min(255, c * f))) for c in rgb)  # type: ignore[return-value]


_SHADOW = (40, 40, 36)


def _draw_road(draw: ImageDraw.ImageDraw, o: SceneObject, k: float) -> None:
    """A road band with markings: runway edge lines and dashes, street centre dashes."""
    draw.polygon(_rotate(o.cx, o.cy, _rect_points(o.length, o.width), o.angle), fill=o.rgb)
    if o.kind == "runway":
        for off in (-o.width / 2 + 1.5 * k, o.width / 2 - 1.5 * k):
            draw.polygon(_rotate(o.cx, o.cy, [(x, y + off) for x, y in _rect_points(o.length, 0.8 * k)], o.angle),
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
        draw.polygon(_rotate(o.cx, o.cy, seg, o.angle), fill=colour)
        t += step


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, k: float, rng: np.random.Generator,
                 water: np.ndarray) -> None:
    """Draw one non-road object with its own details; shadows are drawn beforehand."""
    if o.cls == "building":
        pts = _rotate(o.cx, o.cy, _rect_points(o.length, o.width), o.angle)
        draw.polygon(pts, fill=o.rgb, outline=_darker(o.rgb, 0.75))
        if o.kind in ("house", "farmhouse", "cabin"):  # pitched roof: ridge line and a shaded half
            half = _rotate(o.cx, o.cy, [(-o.length / 2, 0), (o.length / 2, 0), (o.length / 2, o.width / 2),
                                        (-o.length / 2, o.width / 2)], o.angle)
            draw.polygon(half, fill=_darker(o.rgb, 0.82))
        else:  # flat roof: a few rooftop units
            for _ in range(int(rng.integers(1, 4))):
                ux, uy = rng.uniform(-0.35, 0.35) * o.length, rng.uniform(-0.3, 0.3) * o.width
                unit = _rotate(o.cx, o.cy, [(ux - k, uy - k), (ux + k, uy - k), (ux + k, uy + k), (ux - k, uy + k)], o.angle)
                draw.polygon(unit, fill=_darker(o.rgb, 0.7))
    elif o.cls == "plane":
        for part in _plane_parts(o.length):
            draw.polygon(_rotate(o.cx, o.cy, part, o.angle), fill=o.rgb)
    elif o.cls == "storage_tank":
        r = o.length / 2
        draw.ellipse((o.cx - r, o.cy - r, o.cx + r, o.cy + r), fill=_darker(o.rgb, 0.85))
        ri = r * 0.8
        draw.ellipse((o.cx - ri, o.cy - ri, o.cx + ri, o.cy + ri), fill=o.rgb)
        rc = max(0.8 * k, r * 0.12)
        draw.ellipse((o.cx - rc, o.cy - rc, o.cx + rc, o.cy + rc), fill=_darker(o.rgb, 0.7))
    elif o.cls == "ship":
        wake = _rotate(o.cx, o.cy, [(-o.length / 2, -o.width * 0.35), (-o.length * 1.1, -o.width * 0.9),
                                    (-o.length * 1.1, o.width * 0.9), (-o.length / 2, o.width * 0.35)], o.angle)
        size = water.shape[0]
        if all(0 <= x < size and 0 <= y < size and water[int(y), int(x)] for x, y in wake):
            draw.polygon(wake, fill=(95, 130, 160))
        draw.polygon(_rotate(o.cx, o.cy, _ship_hull(o.length, o.width), o.angle), fill=o.rgb)
        cabin = [(-0.38 * o.length, -0.28 * o.width), (-0.12 * o.length, -0.28 * o.width),
                 (-0.12 * o.length, 0.28 * o.width), (-0.38 * o.length, 0.28 * o.width)]
        draw.polygon(_rotate(o.cx, o.cy, cabin, o.angle), fill=_darker(o.rgb, 0.78))
    elif o.cls == "car":
        draw.polygon(_rotate(o.cx, o.cy, _rect_points(o.length, o.width), o.angle), fill=o.rgb)
        glass = [(0.1 * o.length, -0.4 * o.width), (0.3 * o.length, -0.4 * o.width),
                 (0.3 * o.length, 0.4 * o.width), (0.1 * o.length, 0.4 * o.width)]
        draw.polygon(_rotate(o.cx, o.cy, glass, o.angle), fill=(45, 55, 70) if sum(o.rgb) > 200 else (90, 100, 115))
    elif o.cls == "tree":
        r = o.length / 2
        for _ in range(3):
            dx, dy = rng.uniform(-0.3, 0.3, 2) * r
            rr = r * float(rng.uniform(0.55, 0.7))
            draw.ellipse((o.cx + dx - rr, o.cy + dy - rr, o.cx + dx + rr, o.cy + dy + rr),
                         fill=_darker(o.rgb, float(rng.uniform(0.85, 1.15))))


def _draw_shadow(draw: ImageDraw.ImageDraw, o: SceneObject, k: float) -> None:
    """A dark copy of the object's footprint, offset towards the lower right (sun in the upper left)."""
    d = {"building": 2.5, "plane": 1.5, "storage_tank": 2.0, "tree": 1.5, "car": 0.8, "ship": 0.0}[o.cls] * k
    if d <= 0:
        return
    if o.cls in ("storage_tank", "tree"):
        r = o.length / 2
        draw.ellipse((o.cx - r + d, o.cy - r + d, o.cx + r + d, o.cy + r + d), fill=_SHADOW)
    elif o.cls == "plane":
        for part in _plane_parts(o.length):
            draw.polygon(_rotate(o.cx + d, o.cy + d, part, o.angle), fill=_SHADOW)
    else:
        draw.polygon(_rotate(o.cx + d, o.cy + d, _rect_points(o.length, o.width), o.angle), fill=_SHADOW)


def render_scene(scene: SceneDescription, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene`` as an RGB image of side ``scene.size``: land cover, regions, roads, objects."""
    s = scene.size
    k = s / 128
    arr = _texture(rng, scene.background, s)
    water = np.zeros((s, s), dtype=bool)
    flat_regions: list[Region] = []
    canopy_mask: np.ndarray | None = None
    for region in scene.regions:
        if region.kind in ("pier", "marking"):
            flat_regions.append(region)
            continue
        mask = _polygon_mask(region.polygon, s)
        cover = "grass" if region.kind == "clearing" else region.kind
        arr[mask] = _texture(rng, cover, s)[mask]
        if region.kind == "water":
            water |= mask
        if region.kind == "clearing":
            canopy_mask = ~mask
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if scene.background == "forest":
        _forest_canopy(img, rng, canopy_mask if canopy_mask is not None else ~water)
    draw = ImageDraw.Draw(img)
    for region in flat_regions:
        fill = (150, 150, 146) if region.kind == "pier" else (225, 225, 220)
        draw.polygon(list(region.polygon), fill=fill)
        if region.kind == "pier":
            water &= ~_polygon_mask(region.polygon, s)
    for o in scene.objects:
        if o.cls == "road":
            _draw_road(draw, o, k)
            water &= ~_polygon_mask(_rotate(o.cx, o.cy, _rect_points(o.length, o.width), o.angle), s)
    others = [o for o in scene.objects if o.cls != "road"]
    for o in others:
        _draw_shadow(draw, o, k)
    for o in others:
        _draw_object(draw, o, k, rng, water)
    out = np.asarray(img, dtype=np.float32) + rng.normal(0, 2.5, (s, s, 3)).astype(np.float32)
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_SCENE_NPS: dict[str, tuple[tuple[str, str], ...]] = {
    "airport": (("an airport", "at"), ("an airfield", "at"), ("an airport apron", "on")),
    "harbor": (("a harbor", "in"), ("a port", "in"), ("a harbor area", "in")),
    "residential": (("a residential area", "in"), ("a neighborhood", "in"), ("a housing estate", "in")),
    "parking": (("a parking lot", "in"), ("a car park", "in"), ("a parking area", "in")),
    "farmland": (("a farmland area", "in"), ("an agricultural area", "in"), ("a farming area", "in")),
    "forest": (("a forest", "in"), ("a dense forest", "in"), ("a wooded area", "in")),
    "storage": (("a storage area", "in"), ("an oil depot", "in"), ("a tank farm", "in")),
    "desert": (("a desert", "in"), ("a sandy desert", "in"), ("a desert area", "in")),
    "river": (("a riverside area", "in"), ("a river valley", "in"), ("a river landscape", "in")),
    "industrial": (("an industrial area", "in"), ("an industrial zone", "in"), ("a factory area", "in")),
}

_BACKGROUND_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on a green meadow", "on green grass", "surrounded by green grassland", "on a grassy field"),
    "sand": ("on yellow sand", "among sand dunes", "on sandy ground"),
    "forest": ("surrounded by dense trees", "among dark green trees", "inside a thick forest"),
    "soil": ("on bare brown soil", "on bare land", "on brown earth"),
    "urban": ("on grey concrete", "on paved ground", "on grey pavement"),
}

_WATER_PHRASES = ("on the water", "on blue water", "in the dark blue water")

_OPENERS = (
    "an aerial image of", "a top-down view of", "a remote sensing image of", "a satellite image of",
    "an overhead view of", "this image shows", "the picture shows", "we can see",
)

_NOUN_CHOICES: dict[tuple[str, str], tuple[int, ...]] = {
    # (class, scene type) -> indices into CLASS_NOUNS[class]; default is the first two where sensible.
    ("building", "residential"): (0, 1),
    ("building", "farmland"): (0, 1),
    ("building", "harbor"): (0, 2),
    ("building", "industrial"): (0, 2),
    ("building", "storage"): (0, 2),
}

_PRIMARY = {
    "airport": "plane", "harbor": "ship", "residential": "building", "parking": "car", "storage": "storage_tank",
    "industrial": "building", "farmland": None, "forest": None, "desert": None, "river": None,
}


@dataclass(frozen=True)
class _Phrase:
    """A noun phrase for a caption, its grammatical number, and an optional relation suffix."""

    text: str
    plural: bool
    relation: str = ""
    on_water: bool = False
    feature: bool = False


def _article(word: str) -> str:
    """'a' or 'an' for ``word``."""
    return "an" if word[:1] in "aeiou" else "a"


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    """A uniformly random element of ``options``."""
    return options[int(rng.integers(len(options)))]


def _noun(rng: np.random.Generator, cls: str, scene_type: str) -> tuple[str, str]:
    """A (singular, plural) noun for ``cls`` suited to ``scene_type``."""
    nouns = CLASS_NOUNS[cls]
    choices = _NOUN_CHOICES.get((cls, scene_type), (0,) if cls == "building" else tuple(range(len(nouns))))
    return nouns[choices[int(rng.integers(len(choices)))]]


def _counted(rng: np.random.Generator, n: int, noun: tuple[str, str], adjs: list[str], exact: bool = True,
             single: bool = True) -> str:
    """``n`` objects as a noun phrase: "a small red house", "three white planes", "many cars"."""
    adj = " ".join(a for a in adjs if a)
    if n == 1:
        body = f"{adj} {noun[0]}".strip()
        return f"a single {body}" if single and rng.random() < 0.2 else f"{_article(body)} {body}"
    if exact and n in NUMBER_WORDS:
        return f"{NUMBER_WORDS[n]} {adj} {noun[1]}".replace("  ", " ")
    if n >= 8:
        quant = _pick(rng, _MANY_WORDS)
    else:
        quant = _pick(rng, ("some", "several") if n >= 3 else ("some", "a couple of"))
    return f"{quant} {adj} {noun[1]}".replace("  ", " ")


def _object_phrase(rng: np.random.Generator, scene: SceneDescription, cls: str) -> _Phrase:
    """A true noun phrase about all objects of class ``cls``, with counts, colours and sizes."""
    objs = scene.objects_of(cls)
    n = len(objs)
    noun = _noun(rng, cls, scene.scene_type)
    colours = Counter(o.colour for o in objs)
    sizes = {o.size for o in objs}
    exact = not (cls == "tree" and (scene.background == "forest" or n > 8))
    relations = scene.relations_of(cls)
    relation = _pick(rng, relations) if relations and rng.random() < 0.65 else ""
    size_adj = ""
    if len(sizes) == 1 and next(iter(sizes)) in _SIZE_WORDS and rng.random() < 0.6:
        size_adj = _pick(rng, _SIZE_WORDS[next(iter(sizes))])
    mode = rng.random()
    if len(colours) == 1:
        colour = next(iter(colours)) if rng.random() < (0.3 if cls == "tree" else 0.8) else ""
        text = _counted(rng, n, noun, [size_adj, colour], exact)
    elif len(colours) <= 3 and n <= 10 and mode < 0.55 and cls != "tree":
        groups = sorted(colours.items(), key=lambda kv: (-kv[1], kv[0]))
        parts = [_counted(rng, c, noun, [col], single=False) for col, c in groups]
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
        size_adj = ""
    elif mode < 0.8 and len(colours) >= 3:
        text = _counted(rng, n, noun, [size_adj], exact) + " of different colours"
    else:
        text = _counted(rng, n, noun, [size_adj], exact)
    return _Phrase(text, n > 1 or " and " in text, relation, on_water=cls == "ship")


def _feature_phrase(rng: np.random.Generator, scene: SceneDescription) -> _Phrase:
    """One of the scene's layout facts as a noun phrase."""
    text = _pick(rng, scene.features)
    plural = not text.startswith(("a ", "an ")) and (text.endswith("s") or " and " in text)
    return _Phrase(text, plural, feature=True)


def _groups(rng: np.random.Generator, scene: SceneDescription) -> tuple[_Phrase, _Phrase | None]:
    """A primary phrase (usually the scene's key objects) and optionally a second, different one."""
    classes = [c for c in OBJECT_CLASSES if c != "road" and scene.count(c) > 0]
    primary = _PRIMARY[scene.scene_type]
    pool: list[str] = classes + (["__feature__"] if scene.features else [])
    if primary in classes and rng.random() < 0.7:
        first = primary
    elif primary is None and scene.features and rng.random() < 0.5:
        first = "__feature__"
    else:
        first = _pick(rng, pool)
    rest = [c for c in pool if c != first]
    second = _pick(rng, rest) if rest and rng.random() < 0.6 else None

    def phrase(key: str) -> _Phrase:
        return _feature_phrase(rng, scene) if key == "__feature__" else _object_phrase(rng, scene, key)

    return phrase(first), (phrase(second) if second else None)


def _with_rel(p: _Phrase) -> str:
    """Phrase text followed by its relation, if any."""
    return f"{p.text} {p.relation}" if p.relation else p.text


def _one_caption(rng: np.random.Generator, scene: SceneDescription) -> str:
    """One caption from a random template, filled with true phrases."""
    scene_np, prep = _SCENE_NPS[scene.scene_type][int(rng.integers(3))]
    bg = _pick(rng, _BACKGROUND_PHRASES[scene.background])
    opener = _pick(rng, _OPENERS)
    g1, g2 = _groups(rng, scene)
    be = "are" if g1.plural else "is"
    t = int(rng.integers(9))
    if g1.relation:  # avoid "surrounded by trees surrounded by grassland"
        options = [p for p in _BACKGROUND_PHRASES[scene.background]
                   if p.split()[0] in ("on", "in") or p.split()[0] not in g1.relation.split()]
        bg = _pick(rng, options)
    and_ = "as well as" if " and " in g1.text else "and"
    if g1.on_water:  # ships are on the water, never on the land cover
        bg = _pick(rng, _WATER_PHRASES)
    elif g1.feature and scene.scene_type in ("forest", "desert") and t in (3, 6, 7):
        t = 0  # "sand dunes on yellow sand": the feature already is the land cover
    if t == 0:
        text = f"{opener} {scene_np} with {_with_rel(g1)}"
    elif t == 1 and g2:
        text = f"{opener} {scene_np} with {_with_rel(g1)} {and_} {g2.text}"
    elif t == 2 and g1.relation:
        text = f"{g1.text} {be} {g1.relation} {prep} {scene_np}"
    elif t == 3:
        text = f"there {be} {_with_rel(g1)} {bg}"
    elif t == 4 and g2:
        text = f"{scene_np} {_pick(rng, ('contains', 'has', 'includes'))} {g1.text} {and_} {_with_rel(g2)}"
    elif t == 5 and g2:
        text = f"{_with_rel(g1)} {and_} {g2.text} can be seen {prep} {scene_np}"
    elif t == 6:
        text = f"{_with_rel(g1)} {bg}"
    elif t == 7:
        text = f"{scene_np} {bg} with {_with_rel(g1)}"
    else:
        text = f"{opener} {_with_rel(g1)} {prep} {scene_np}"
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] + "."


def make_captions(scene: SceneDescription, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct captions of ``scene``; every count, colour, size and relation is true.

    Random templates are tried until ``n`` different sentences exist; if a sparse scene ever runs
    out of variety, plain "<opener> <scene>." sentences (24 distinct per scene type) fill up.
    """
    captions: list[str] = []
    for _ in range(40 * n):
        if len(captions) == n:
            return captions
        c = _one_caption(rng, scene)
        if c not in captions:
            captions.append(c)
    for opener in _OPENERS:
        for scene_np, _ in _SCENE_NPS[scene.scene_type]:
            c = f"{opener[0].upper()}{opener[1:]} {scene_np}."
            if len(captions) < n and c not in captions:
                captions.append(c)
    if len(captions) < n:
        raise ConfigError(f"captions_per_image={n} is more than the synthetic generator can vary")
    return captions


def tokenize(text: str) -> list[str]:
    """Lowercase words without punctuation, as in the Karpathy ``tokens`` field."""
    return re.findall(r"[a-z0-9]+", text.lower())


# --------------------------------------------------------------------------------------------
# Dataset files
# --------------------------------------------------------------------------------------------


def _check_args(num_images: int, image_size: int, split_fractions: tuple[float, ...], captions_per_image: int) -> None:
    """Reject arguments that cannot give a valid dataset."""
    if num_images < 3:
        raise ConfigError(f"num_images must be at least 3 (one per split), got {num_images}")
    if image_size < 32:
        raise ConfigError(f"image_size must be at least 32 pixels, got {image_size}")
    if captions_per_image < 1:
        raise ConfigError(f"captions_per_image must be at least 1, got {captions_per_image}")
    if len(split_fractions) != 3 or any(f <= 0 for f in split_fractions) or abs(sum(split_fractions) - 1) > 1e-6:
        raise ConfigError(f"split_fractions must be three positive numbers summing to 1, got {split_fractions}")


def assign_splits(num_images: int, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)) -> list[str]:
    """Split name of each image: a seeded shuffle cut by ``fractions``; every split gets >= 1 image."""
    n_val = max(1, math.floor(fractions[1] * num_images + 0.5))  # round half up, not to even
    n_test = max(1, math.floor(fractions[2] * num_images + 0.5))
    n_train = num_images - n_val - n_test
    if n_train < 1:
        n_train, n_val, n_test = 1, max(1, num_images - 2), 1
    order = np.random.default_rng([int(seed), 2**31 - 1]).permutation(num_images)
    splits = [""] * num_images
    for rank, img in enumerate(order.tolist()):
        splits[img] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return splits


def _detections_entry(scene: SceneDescription) -> dict[str, list]:
    """Boxes, scores and labels of one image, ordered by decreasing score (see module docstring)."""
    order = sorted(
        range(len(scene.objects)),
        key=lambda i: (scene.objects[i].cls == "road",
                       -(scene.objects[i].box[2] - scene.objects[i].box[0]) * (scene.objects[i].box[3] - scene.objects[i].box[1]),
                       i),
    )
    return {
        "boxes": [list(scene.objects[i].box) for i in order],
        "scores": [round(1.0 - 0.001 * rank, 3) for rank in range(len(order))],
        "labels": [scene.objects[i].cls for i in order],
    }


def _save_png(img: Image.Image, path: Path) -> None:
    """Write a PNG atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def generate_synthetic(
    out_dir: str | Path,
    num_images: int = 600,
    image_size: int = 128,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    captions_per_image: int = 5,
    progress: bool = True,
) -> RetrievalDataset:
    """Generate the synthetic dataset into ``out_dir`` and return it.

    Writes ``images/synth_XXXXX.png``, ``dataset_synth.json`` (Karpathy layout, ``label`` = scene
    type) and ``detections.json`` (ground-truth boxes); see the module docstring for the layouts.
    Deterministic: the same arguments give byte-identical files, and image ``i`` (and its captions
    and boxes) does not depend on ``num_images``; only the split assignment does.

    Raises:
        ConfigError: an argument is out of range.
    """
    _check_args(num_images, image_size, tuple(split_fractions), captions_per_image)
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(num_images, seed, tuple(split_fractions))  # type: ignore[arg-type]
    files: list[str] = []
    labels: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    karpathy: list[dict] = []
    detections: dict[str, dict] = {}
    for i in tqdm(range(num_images), desc="synthetic images", unit="img", disable=not progress):
        scene = make_scene(seed, i, image_size)
        filename = f"synth_{i:05d}.png"
        _save_png(render_scene(scene, _rng(seed, i, 1)), image_dir / filename)
        texts = make_captions(scene, _rng(seed, i, 2), captions_per_image)
        first = len(captions)
        karpathy.append({
            "filename": filename,
            "imgid": i,
            "split": splits[i],
            "sentences": [
                {"raw": t, "tokens": tokenize(t), "imgid": i, "sentid": first + j} for j, t in enumerate(texts)
            ],
            "sentids": list(range(first, first + len(texts))),
            "label": scene.scene_type,
        })
        detections[filename] = _detections_entry(scene)
        files.append(filename)
        labels.append(scene.scene_type)
        captions.extend(texts)
        caption_image.extend([i] * len(texts))
    json_path = out / "dataset_synth.json"
    write_json(json_path, {"dataset": "synth", "images": karpathy})
    write_json(out / "detections.json", {"format": "rsitr-detections-v1", "images": detections})
    return RetrievalDataset(
        name="synth",
        image_dir=image_dir,
        image_files=files,
        image_splits=splits,
        captions=captions,
        caption_image=np.array(caption_image, dtype=np.int64),
        scene_labels=labels,
        source=json_path,
    )
