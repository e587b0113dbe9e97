"""Scene layouts: for each scene type, which regions and objects appear and where.

The land scenes are here, the harbor and the river in :mod:`.water_layouts`; :data:`LAYOUTS`
maps every scene type to its layout.

Each layout takes a :class:`~rsitr.data.synth.placement.SceneBuilder` (``b``) and fills its scene:
regions (water, fields, piers ...), roads, objects, the relation phrases that are true of every
object of a class ("parked near the runway") and feature phrases ("two piers"). Lengths are given
at 128 px and multiplied by ``k = b.scale``; ``s = b.size`` is the image side.

The order of the random calls in each layout fixes the images of a seed: moving, adding or
removing a call changes the dataset.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from rsitr.data.synth.geometry import Point
from rsitr.data.synth.placement import SIZE_RANGES, SceneBuilder
from rsitr.data.synth.scene import NUMBER_WORDS, PALETTES
from rsitr.data.synth.water_layouts import scene_harbor, scene_river

# -- airport ---------------------------------------------------------------------------------


def _apron_polygon(s: float, horizontal: bool, edge: float, far: float) -> list[Point]:
    """The paved strip between the runway edge ``edge`` and the image border ``far``."""
    if horizontal:
        return [(0, edge), (s, edge), (s, far), (0, far)]
    return [(edge, 0), (edge, s), (far, s), (far, 0)]


def _scene_airport(b: SceneBuilder) -> None:
    """A runway near one border, an apron beyond it, planes and sometimes a terminal."""
    s, k = b.size, b.scale
    horizontal = bool(b.rng.random() < 0.5)
    width = b.uniform(13, 18) * k
    near_start = bool(b.rng.random() < 0.5)
    pos = b.uniform(0.14, 0.22) * s if near_start else b.uniform(0.78, 0.86) * s
    # The apron: paved area on the far side of the runway.
    edge = pos + (width / 2 + 3 * k) * (1 if near_start else -1)
    far = s if near_start else 0
    if b.scene.background == "grass":
        b.add_region("apron", "grey", _apron_polygon(s, horizontal, edge, far))
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


# -- residential -----------------------------------------------------------------------------

_HOUSE_COLOURS = ("red", "grey", "brown", "orange", "white")


def _house_row(b: SceneBuilder, horizontal: bool, pos: float, sign: int, road_width: float,
               colour: str | None, size: str | None, room: int) -> int:
    """Houses along one side (``sign``) of the road at ``pos``, at most ``room``; returns how many were placed."""
    s, k = b.size, b.scale
    placed = 0
    t = b.uniform(4, 12) * k
    while t < s - 6 * k and placed < room:
        sz = size or b.pick_size("building")
        col = colour or b.pick_colour("building", _HOUSE_COLOURS)
        length = b.length_for("building", sz)
        width = length * b.uniform(0.6, 0.9)
        off = pos + sign * (road_width / 2 + 2.5 * k + width / 2)
        cx, cy = (t + length / 2, off) if horizontal else (off, t + length / 2)
        ang = 0.0 if horizontal else 90.0
        if b.rng.random() < 0.8 and b.try_add(b.make("building", "house", col, sz, cx, cy, length, width, ang),
                                               gap=1.5 * k):
            placed += 1
        t += length + b.uniform(3, 8) * k
    return placed


def _scene_residential(b: SceneBuilder) -> None:
    """One or two streets with rows of houses on both sides, trees and sometimes cars."""
    s, k = b.size, b.scale
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
    colour, size = b.group_attrs("building", _HOUSE_COLOURS, 0.6, 0.6)
    target = int(b.rng.integers(3, 11))
    placed = 0
    # Houses in rows on both sides of each road, so "beside the road" is true of every one.
    for horizontal, pos in roads:
        for sign in (-1, 1):
            placed += _house_row(b, horizontal, pos, sign, rw, colour, size, target - placed)
    b.relate("building", "beside the road")
    b.relate("building", "lined along the street")
    n_trees = b.scatter("tree", "tree", int(b.rng.integers(0, 9)), colour="green", gap=1)
    if n_trees >= 4:
        b.relate("building", "surrounded by trees")
    if b.rng.random() < 0.5:
        b.scatter("car", "car", int(b.rng.integers(1, 4)), where="road", angle_step=90.0, gap=2 * k)
        b.relate("car", "driving on the road")


# -- parking ---------------------------------------------------------------------------------


def _parking_row(b: SceneBuilder, cy: float, x0: float, x_end: float, slot: float, fill: float,
                 colours: tuple[str, ...]) -> None:
    """One row of parking spaces at height ``cy``: a white line per slot, a car in a ``fill`` share of them."""
    k = b.scale
    x = x0
    while x + slot <= x_end:
        line = [(x - 0.4 * k, cy - 4.5 * k), (x + 0.4 * k, cy - 4.5 * k), (x + 0.4 * k, cy + 4.5 * k), (x - 0.4 * k, cy + 4.5 * k)]
        b.add_region("marking", "white", line)
        if b.rng.random() < fill:
            length = b.length_for("car", "medium")
            col = b.pick_colour("car", colours)
            b.try_add(b.make("car", "car", col, "medium", x + slot / 2, cy, length, length * 0.5, 90.0), gap=0)
        x += slot


def _scene_parking(b: SceneBuilder) -> None:
    """A road along one border and rows of marked spaces with parked cars of a few colours."""
    s, k = b.size, b.scale
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
        _parking_row(b, top + (r + 0.5) * row_h, x0, x_end, slot, fill, colours)
    if b.scene.count("car") == 0:
        b.try_add(b.make("car", "car", colours[0], "medium", x0 + slot / 2, top + 0.5 * row_h, 6.5 * k, 3.2 * k, 90.0), gap=0)
    b.relate("car", "parked in rows")
    b.relate("car", "in the parking lot")
    b.scene.features.append(str(b.rng.choice(["white parking lines", "rows of parking spaces", "a road along the parking lot"])))
    if b.rng.random() < 0.35:
        b.scatter("building", "building", 1, colour=b.pick_colour("building", ("grey", "white", "blue")), size="large", gap=2 * k)
    if b.rng.random() < 0.5:
        b.scatter("tree", "tree", int(b.rng.integers(1, 5)), colour="green", size="small", gap=1)


# -- farmland --------------------------------------------------------------------------------

_FIELD_COLOURS = ["green", "yellow", "brown"]


def _field_grid(b: SceneBuilder) -> list[str]:
    """A grid of 2-9 crop fields separated by thin margins; returns the field colours in drawing order."""
    s, k = b.size, b.scale
    cols = int(b.rng.integers(1, 4))
    rows = int(b.rng.integers(2, 4))
    xs = [0.0] + sorted(b.uniform(0.2, 0.8) * s for _ in range(cols - 1)) + [float(s)]
    ys = [0.0] + sorted(b.uniform(0.2, 0.8) * s for _ in range(rows - 1)) + [float(s)]
    field_colours: list[str] = []
    gap = 1.5 * k
    for i in range(cols):
        for j in range(rows):
            colour = str(b.rng.choice(_FIELD_COLOURS, p=[0.45, 0.35, 0.2]))
            field_colours.append(colour)
            rect = [(xs[i] + gap, ys[j] + gap), (xs[i + 1] - gap, ys[j] + gap),
                    (xs[i + 1] - gap, ys[j + 1] - gap), (xs[i] + gap, ys[j + 1] - gap)]
            b.add_region(f"field_{colour}", colour, rect)
    return field_colours


def _field_features(field_colours: list[str]) -> list[str]:
    """Feature phrases of a field grid: how many fields, which colours, their shape."""
    present = sorted(set(field_colours), key=_FIELD_COLOURS.index)
    count = f"{NUMBER_WORDS.get(len(field_colours), 'many')} fields"
    colours = f"{present[0]} fields" if len(present) == 1 else " and ".join(present) + " fields"
    return [count, colours, "rectangular fields"]


def _scene_farmland(b: SceneBuilder) -> None:
    """A grid of green, yellow and brown fields, maybe a dirt road, farmhouses and trees."""
    s, k = b.size, b.scale
    b.scene.features.extend(_field_features(_field_grid(b)))
    if b.rng.random() < 0.45:
        b.straight_road("dirt road", "brown", b.uniform(4, 6) * k, bool(b.rng.random() < 0.5), b.uniform(0.25, 0.75) * s)
        b.scene.features.append("a dirt road")
    if b.rng.random() < 0.5:
        b.scatter("building", "farmhouse", int(b.rng.integers(1, 3)), colour=b.pick_colour("building", ("red", "white", "grey")), gap=2 * k)
    n_trees = b.scatter("tree", "tree", int(b.rng.integers(0, 6)), colour="green", gap=1)
    if b.scene.count("building") + n_trees == 0:
        b.scatter("tree", "tree", 2, colour="green", gap=1, tries=200)
    b.relate("tree", "scattered among the fields")


# -- forest ----------------------------------------------------------------------------------


def _clearing_with_cabin(b: SceneBuilder) -> None:
    """A round grass clearing in the canopy with a small cabin in its centre."""
    s, k = b.size, b.scale
    cx, cy = b.uniform(0.25, 0.75) * s, b.uniform(0.25, 0.75) * s
    r = b.uniform(14, 20) * k
    clearing = [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 12, endpoint=False)]
    b.add_region("clearing", "green", clearing)
    if b.try_add(b.make("building", "cabin", b.pick_colour("building", ("brown", "red", "grey")), "small", cx, cy,
                        9 * k, 6 * k, 0.0), gap=1):
        b.relate("building", "in a clearing")


def _scene_forest(b: SceneBuilder) -> None:
    """Dense canopy (drawn by the renderer), large trees, maybe a road or a clearing with a cabin."""
    s, k = b.size, b.scale
    if b.rng.random() < 0.4:
        b.straight_road("road", "brown", b.uniform(4, 6) * k, bool(b.rng.random() < 0.5), b.uniform(0.3, 0.7) * s)
        b.scene.features.append(str(b.rng.choice(["a narrow road", "a path through the trees"])))
    b.scene.features.append(str(b.rng.choice(["dense trees", "a thick green canopy", "dark green woods"])))
    if b.rng.random() < 0.3:
        _clearing_with_cabin(b)
    colour = str(b.rng.choice(["light green", "dark green"]))
    b.scatter("tree", "tree", int(b.rng.integers(3, 9)), colour=colour, size="large", gap=1)
    b.relate("tree", "growing densely")


# -- storage ---------------------------------------------------------------------------------


def _tank_grid(b: SceneBuilder, horizontal: bool, pos: float, road_width: float,
               colour: str | None, size: str | None) -> None:
    """Storage tanks on a regular grid on the side of the road at ``pos`` that has more room."""
    s, k = b.size, b.scale
    size_for_grid = size or "medium"
    diam = SIZE_RANGES["storage_tank"][size_for_grid][1] * k
    step = diam * b.uniform(1.25, 1.5)
    rows = int(b.rng.integers(1, 4))
    cols = int(b.rng.integers(2, 5))
    # Fit the grid inside the area away from the road.
    lo = pos + road_width / 2 + 3 * k if pos < s / 2 else 3 * k
    hi = s - 3 * k if pos < s / 2 else pos - road_width / 2 - 3 * k
    along0 = b.uniform(4, 20) * k
    for r in range(rows):
        for c in range(cols):
            a = along0 + (c + 0.5) * step
            o = lo + (r + 0.5) * step
            if o + diam / 2 > hi:
                continue
            cx, cy = (a, o) if horizontal else (o, a)
            sz = size or b.pick_size("storage_tank")
            d = min(b.length_for("storage_tank", sz), diam)
            col = colour or b.pick_colour("storage_tank")
            b.try_add(b.make("storage_tank", "tank", col, sz, cx, cy, d, d), gap=0)


def _scene_storage(b: SceneBuilder) -> None:
    """A tank farm: a road near one border, a grid of storage tanks and sometimes buildings."""
    s, k = b.size, b.scale
    horizontal = bool(b.rng.random() < 0.5)
    pos = b.uniform(0.08, 0.14) * s if b.rng.random() < 0.5 else b.uniform(0.86, 0.92) * s
    rw = b.uniform(6, 9) * k
    b.straight_road("road", "grey", rw, horizontal, pos)
    colour, size = b.group_attrs("storage_tank", p_same_colour=0.75, p_same_size=0.8)
    _tank_grid(b, horizontal, pos, rw, colour, size)
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


# -- desert ----------------------------------------------------------------------------------


def _scene_desert(b: SceneBuilder) -> None:
    """Rippled sand, maybe a road with cars, and a few buildings (always some, when there is no road)."""
    s, k = b.size, b.scale
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


# -- industrial ------------------------------------------------------------------------------


def _scene_industrial(b: SceneBuilder) -> None:
    """One or two roads, large flat-roofed factories, maybe tanks and cars."""
    s, k = b.size, b.scale
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


#: Scene type -> (layout, land covers it may be drawn on).
LAYOUTS: dict[str, tuple[Callable[[SceneBuilder], None], tuple[str, ...]]] = {
    "airport": (_scene_airport, ("grass", "urban")),
    "harbor": (scene_harbor, ("urban", "soil")),
    "residential": (_scene_residential, ("grass",)),
    "parking": (_scene_parking, ("urban",)),
    "farmland": (_scene_farmland, ("soil",)),
    "forest": (_scene_forest, ("forest",)),
    "storage": (_scene_storage, ("soil", "urban")),
    "desert": (_scene_desert, ("sand",)),
    "river": (scene_river, ("grass", "forest")),
    "industrial": (_scene_industrial, ("urban", "soil")),
}
