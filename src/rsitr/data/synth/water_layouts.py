"""Waterside scene layouts: the harbor and the river, the two scenes drawn around water.

They share what the land layouts do not need: a water region with a natural edge (a jagged
shoreline, a meandering band), structures reaching into it (piers, a bridge), ships placed
entirely on the water and trees along its banks. Conventions are those of :mod:`.layouts`
(``b`` is the builder, lengths at 128 px times ``k``; the order of random calls fixes the images).
"""

from __future__ import annotations

import math

from rsitr.data.synth.geometry import Point
from rsitr.data.synth.placement import SceneBuilder
from rsitr.data.synth.scene import NUMBER_WORDS


def _count_words(n: int) -> str:
    """'a' / number word for small counts, used in feature phrases."""
    return "a" if n == 1 else NUMBER_WORDS.get(n, "many")


# -- harbor ----------------------------------------------------------------------------------


def _shore_water(b: SceneBuilder, side: int, depth: float) -> list[Point]:
    """Water polygon reaching ``depth`` pixels in from ``side`` (0 top, 1 right, 2 bottom, 3 left), jagged shore."""
    s, k = b.size, b.scale
    n = 6
    jag = [b.uniform(-3, 3) * k for _ in range(n + 1)]
    along = [i * s / n for i in range(n + 1)]
    if side == 0:
        return [(a, depth + j) for a, j in zip(along, jag)] + [(s, 0), (0, 0)]
    if side == 2:
        return [(a, s - depth + j) for a, j in zip(along, jag)] + [(s, s), (0, s)]
    if side == 3:
        return [(depth + j, a) for a, j in zip(along, jag)] + [(0, s), (0, 0)]
    return [(s - depth + j, a) for a, j in zip(along, jag)] + [(s, s), (s, 0)]


def _pier(b: SceneBuilder, side: int, depth: float, index: int, count: int) -> list[Point]:
    """Rectangle of pier ``index`` of ``count``, starting on land and reaching into the water."""
    s, k = b.size, b.scale
    a = (index + 1) * s / (count + 1) + b.uniform(-6, 6) * k
    plen = b.uniform(0.25, 0.38) * s
    pw = b.uniform(3, 4.5) * k
    shore = depth if side in (0, 3) else s - depth
    into = -1 if side in (0, 3) else 1
    y0, y1 = shore - into * 3 * k, shore + into * plen
    if side in (0, 2):
        return [(a - pw / 2, y0), (a + pw / 2, y0), (a + pw / 2, y1), (a - pw / 2, y1)]
    return [(y0, a - pw / 2), (y0, a + pw / 2), (y1, a + pw / 2), (y1, a - pw / 2)]


def scene_harbor(b: SceneBuilder) -> None:
    """Water along one side with piers and ships; warehouses and tanks on the shore."""
    k = b.scale
    side = int(b.rng.integers(4))  # 0 top, 1 right, 2 bottom, 3 left: where the water is
    depth = b.uniform(0.5, 0.62) * b.size
    b.add_region("water", "blue", _shore_water(b, side, depth))
    piers = int(b.rng.integers(0, 3))
    for i in range(piers):
        b.add_region("pier", "grey", _pier(b, side, depth, i, piers))
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


# -- river -----------------------------------------------------------------------------------


def _river_band(ts: list[float], offs: list[float], width: float, horizontal: bool) -> list[Point]:
    """Polygon of a river of ``width`` whose centre line passes through ``(ts[i], offs[i])``."""
    side_a = [(t, o - width / 2) for t, o in zip(ts, offs)]
    side_b = [(t, o + width / 2) for t, o in zip(ts, offs)][::-1]
    poly = side_a + side_b
    return poly if horizontal else [(y, x) for x, y in poly]


def _bank_trees(b: SceneBuilder, horizontal: bool, ts: list[float], offs: list[float], width: float) -> int:
    """Trees just outside the river banks, sampled near the centre-line points; returns how many were placed."""
    k = b.scale
    n_target = int(b.rng.integers(2, 9))
    placed = 0
    for _ in range(n_target * 30):
        if placed >= n_target:
            break
        i = int(b.rng.integers(len(ts)))
        t, o = ts[i], offs[i]
        sign = -1 if b.rng.random() < 0.5 else 1
        d = b.length_for("tree", "medium")
        off = o + sign * (width / 2 + d / 2 + b.uniform(1, 4) * k)
        cx, cy = (t, off) if horizontal else (off, t)
        if b.try_add(b.make("tree", "tree", "green", "medium", cx, cy, d, d), gap=1):
            placed += 1
    return placed


def scene_river(b: SceneBuilder) -> None:
    """A winding or straight river across the image, maybe a bridge and boats, trees on the banks."""
    s, k = b.size, b.scale
    horizontal = bool(b.rng.random() < 0.5)
    centre = b.uniform(0.38, 0.62) * s
    width = b.uniform(16, 26) * k
    amp = b.uniform(2, 9) * k
    phase = b.uniform(0, 2 * math.pi)
    steps = 16
    ts = [i * s / steps for i in range(steps + 1)]
    offs = [centre + amp * math.sin(phase + 2 * math.pi * t / s) for t in ts]
    b.add_region("water", "blue", _river_band(ts, offs, width, horizontal))
    b.scene.features.append("a winding river" if amp > 5 * k else "a straight river")
    if b.rng.random() < 0.4:
        b.straight_road("bridge", "light grey", b.uniform(5, 7) * k, not horizontal, b.uniform(0.3, 0.7) * s)
        b.scene.features.append("a bridge over the river")
    if b.rng.random() < 0.6:
        colour, size = b.group_attrs("ship", p_same_colour=0.6)
        b.scatter("ship", "boat", int(b.rng.integers(1, 4)), where="water", colour=colour,
                  size=size if size != "large" else "small", angle_step=180.0 if horizontal else None, gap=2 * k)
        b.relate("ship", "sailing on the river")
    if _bank_trees(b, horizontal, ts, offs, width) == 0:
        b.scatter("tree", "tree", 2, colour="green", size="medium", tries=200)
    b.relate("tree", "along the riverbank")
