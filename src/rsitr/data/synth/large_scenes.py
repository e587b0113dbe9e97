"""Large synthetic scenes with ground-truth regions: a semantic-localisation benchmark that ships with rsitr.

Semantic localisation (SeLo, Yuan et al. 2022; see the SeLo metrics summary) asks where in a large
image (thousands of pixels a side) a sentence is true. :func:`generate_large_scenes` draws such
images from the chip generator of :mod:`rsitr.data.synth`, so that a model trained on the synthetic
chip dataset (``rsitr data synth``) knows every word of the queries:

* a canvas of ``width × height`` pixels (each drawn from ``size_range``) covered by one land cover,
  ``grass`` or ``soil``. Those two are chosen because an empty stretch of either is not the look of a
  scene type on its own (sand is the desert, canopy the forest, pavement the parking lot), so the
  background answers no query;
* several non-overlapping square *blocks* (sides from ``block_range``, at least ``block_gap`` pixels
  apart), each a whole synthetic scene of one type laid out and rendered at the block's side by the
  chip generator (:data:`~rsitr.data.synth.layouts.LAYOUTS`, :func:`render_scene`). A scene type is
  used by at most one block per image, so a caption naming it has exactly one true region;
* per block, ``captions_per_block`` captions written by :func:`make_captions` from the block's own
  scene description, so every count, colour and relation they state is true of the block.

Choices a reviewer should know about:

* **No position relations.** Chip scenes get "located in the upper part of the image" phrases
  (:func:`~rsitr.data.synth.sampling.add_position_relations`); here "the image" would be the large
  scene, where they are false, so blocks are built without them. Other layout phrases ("a road running
  from left to right") stay true because blocks are pasted unrotated.
* **Captions name their scene.** A caption such as "there are five white cars on grey concrete" names
  no scene type and may also be true of another block (cars drive through a residential block too).
  Of a pool of distinct captions, those naming the block's scene ("... in a parking lot") are taken
  first; only if fewer than ``captions_per_block`` of them exist are the others used.
* **Square, axis-aligned outlines.** The captions describe the whole block (counts of every object in
  it), so an outline cutting into the block could make them false; the block's pixels are exactly the
  inside of its polygon.
* **Polygon vertices are the block's corner pixels:** a block at ``(x, y)`` of side ``s`` covers pixel
  columns ``x .. x + s - 1`` and its polygon is ``(x, y), (x + s - 1, y), (x + s - 1, y + s - 1),
  (x, y + s - 1)``, the convention of :func:`rsitr.localization_metrics.polygon_mask` (boundary pixels
  included), which therefore fills exactly the block's pixels.
* **Background at the blocks' scale.** :func:`render_scene` draws a land cover at ``side / 128`` times
  the chip scale, so a single canvas-sized render would look 5-8 times coarser than the blocks. The
  canvas is instead covered by ``background_tile``-pixel land-cover renders (scale 4 at 512 px, the
  blocks' 3-7), cross-faded over a quarter of a tile so that no seam shows. Rows of tiles are
  streamed into the canvas, so memory stays near the canvas itself (48 MB at 4000²) plus two strips.

Every random choice comes from a stream of ``(seed, scene, stream, part)``, so scene ``i`` does not
depend on ``num_scenes`` and the same arguments give byte-identical files.

Files written into ``out_dir``::

    images/scene_00000.png ...
    anno.json     SeLo layout, one sample per caption:
                  [{"caption", "jpg_name": "scene_00000.png", "points": [[[x, y], ...]]}, ...]
    scenes.json   {"format": "rsitr-large-scenes-v1", "description", "seed", the size arguments,
                   "scenes": [{"image", "width", "height", "background",
                               "blocks": [{"scene_type", "box": [x1, y1, x2, y2], "polygon",
                                           "background", "objects", "captions"}]}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsitr.data.synth.captions import _SCENE_NPS, make_captions  # the caption writer's scene noun phrases
from rsitr.data.synth.layouts import LAYOUTS
from rsitr.data.synth.placement import SceneBuilder
from rsitr.data.synth.render import render_scene
from rsitr.data.synth.scene import SCENE_TYPES, SceneDescription
from rsitr.errors import ConfigError
from rsitr.io import save_image, write_json
from rsitr.localization_metrics import LocalizationSample, write_annotations
from rsitr.progress import progress_bar

#: Land covers of the canvas between the blocks (see the module docstring for why these two).
CANVAS_COVERS: tuple[str, ...] = ("grass", "soil")

#: First element of every random-stream key here, apart from the chip generator's ``(seed, index, stream)``.
_TAG = 7_130_013
#: Stream numbers of :func:`_stream`.
_LAYOUT, _BACKGROUND, _BLOCK_SCENE, _BLOCK_RENDER, _BLOCK_CAPTIONS = 0, 1, 2, 3, 4
#: Distinct captions drawn per block before those naming the scene are picked.
_CAPTION_POOL = 12
#: Placement attempts per block before its scene type is left out of the image.
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SceneBlock:
    """One block of a large scene: a chip-generator scene of one type pasted at ``(x, y)``.

    Attributes:
        scene_type: one of ``SCENE_TYPES``, unique within its image.
        x, y: top-left pixel of the block.
        side: block side in pixels.
        background: the block's own land cover.
        num_objects: objects drawn in the block (roads included).
        captions: captions true of the block, one SeLo sample each.
    """

    scene_type: str
    x: int
    y: int
    side: int
    background: str
    num_objects: int
    captions: tuple[str, ...]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` with ``x2``/``y2`` exclusive."""
        return (self.x, self.y, self.x + self.side, self.y + self.side)

    @property
    def polygon(self) -> np.ndarray:
        """The block outline, ``(4, 2)`` float64 ``(x, y)``: its corner pixels, clockwise from the top left."""
        return square_polygon(self.x, self.y, self.side)


@dataclass
class LargeScene:
    """One written image: its size, canvas land cover and blocks."""

    image: str
    width: int
    height: int
    background: str
    blocks: list[SceneBlock] = field(default_factory=list)


def square_polygon(x: int, y: int, side: int) -> np.ndarray:
    """The ``side``-pixel square at ``(x, y)`` as a SeLo polygon: its corner pixels, clockwise from the top left.

    Vertices are pixel indices (``x + side - 1`` is the last column), so a rasteriser that includes
    boundary pixels (:func:`rsitr.localization_metrics.polygon_mask`) fills exactly the square.
    """
    last_x, last_y = x + side - 1, y + side - 1
    return np.array([[x, y], [last_x, y], [last_x, last_y], [x, last_y]], dtype=np.float64)


# -- arguments and random streams ---------------------------------------------------------------


def _check_range(name: str, value: Sequence[int], low: int, high: int | None = None) -> tuple[int, int]:
    """``value`` as an ``(lo, hi)`` pair of ints with ``low <= lo <= hi (<= high)``; ConfigError otherwise."""
    if len(value) != 2 or any(int(v) != v for v in value):
        raise ConfigError(f"{name} must be two integers (lo, hi), got {value!r}")
    lo, hi = int(value[0]), int(value[1])
    if not low <= lo <= hi or (high is not None and hi > high):
        upper = f" and hi <= {high}" if high is not None else ""
        raise ConfigError(f"{name} must satisfy {low} <= lo <= hi{upper}, got {value!r}")
    return lo, hi


def _check_args(num_scenes: int, size_range: Sequence[int], block_range: Sequence[int], blocks_per_scene: Sequence[int],
                captions_per_block: int, block_gap: int, background_tile: int
                ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """The three ranges as int pairs; a one-line ConfigError for arguments that cannot give a valid benchmark."""
    if num_scenes < 1:
        raise ConfigError(f"num_scenes must be at least 1, got {num_scenes}")
    sizes = _check_range("size_range", size_range, 64)
    blocks = _check_range("block_range", block_range, 64, sizes[0])  # the first block always fits
    per_scene = _check_range("blocks_per_scene", blocks_per_scene, 1, len(SCENE_TYPES))
    if not 1 <= captions_per_block <= 5:
        raise ConfigError(f"captions_per_block must be 1 to 5, got {captions_per_block}")
    if block_gap < 0:
        raise ConfigError(f"block_gap must be >= 0 pixels, got {block_gap}")
    if background_tile < 64:
        raise ConfigError(f"background_tile must be at least 64 pixels, got {background_tile}")
    return sizes, blocks, per_scene


def _stream(seed: int, scene: int, stream: int, part: int = 0) -> np.random.Generator:
    """Random stream ``stream`` of part ``part`` (a tile, a block) of scene ``scene``."""
    return np.random.default_rng([_TAG, int(seed), int(scene), int(stream), int(part)])


# -- layout ---------------------------------------------------------------------------------------


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]], gap: int) -> bool:
    """Whether ``box`` grown by ``gap`` pixels on every side intersects one of ``others``."""
    x1, y1, x2, y2 = box
    return any(x1 - gap < b[2] and b[0] < x2 + gap and y1 - gap < b[3] and b[1] < y2 + gap for b in others)


def plan_blocks(rng: np.random.Generator, width: int, height: int, block_range: tuple[int, int],
                blocks_per_scene: tuple[int, int], gap: int) -> list[tuple[str, int, int, int]]:
    """Scene type, x, y and side of each block of one image: distinct types, no two blocks closer than ``gap``.

    The number of blocks and their types (a seeded sample of ``SCENE_TYPES`` without replacement) are
    drawn first; each block then gets a side and up to ``_PLACEMENT_TRIES`` random positions, and its
    type is left out when none is free, so a crowded canvas simply holds fewer blocks.
    """
    n = int(rng.integers(blocks_per_scene[0], blocks_per_scene[1] + 1))
    types = [SCENE_TYPES[int(i)] for i in rng.permutation(len(SCENE_TYPES))[:n]]
    placed: list[tuple[str, int, int, int]] = []
    boxes: list[tuple[int, int, int, int]] = []
    for scene_type in types:
        side = int(rng.integers(block_range[0], block_range[1] + 1))
        for _ in range(_PLACEMENT_TRIES):
            x = int(rng.integers(0, width - side + 1))
            y = int(rng.integers(0, height - side + 1))
            box = (x, y, x + side, y + side)
            if not _overlaps(box, boxes, gap):
                placed.append((scene_type, x, y, side))
                boxes.append(box)
                break
    return placed


# -- background ----------------------------------------------------------------------------------


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along an axis: 0, stride, ... with the last one ending at the edge (one tile if short)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _ramp(n: int, overlap: int) -> np.ndarray:
    """Cross-fade weights of a tile of ``n`` pixels: rising over ``overlap`` pixels at each end, never 0."""
    t = np.arange(n, dtype=np.float32) + 0.5
    return np.minimum(1.0, np.minimum(t, n - t) / max(1, overlap)).astype(np.float32)


def _tile_row(seed: int, scene: int, row: int, cover: str, width: int, height: int, tile: int,
              starts_x: list[int]) -> np.ndarray:
    """One horizontal strip (``height`` rows) of the background: tiles cross-faded along x."""
    w_x = _ramp(min(tile, width), tile // 4)
    acc = np.zeros((height, width, 3), dtype=np.float32)
    weight = np.zeros(width, dtype=np.float32)
    for col, x0 in enumerate(starts_x):
        rng = _stream(seed, scene, _BACKGROUND, row * len(starts_x) + col)
        # An object-free scene is just the land cover: texture, pattern and sensor noise of the renderer.
        pixels = np.asarray(render_scene(SceneDescription("background", cover, tile), rng), dtype=np.float32)
        tw = min(tile, width)
        acc[:, x0:x0 + tw] += pixels[:height, :tw] * w_x[None, :, None]
        weight[x0:x0 + tw] += w_x
    return acc / weight[None, :, None]


def render_background(seed: int, scene: int, cover: str, width: int, height: int, tile: int = 512) -> np.ndarray:
    """The canvas land cover, ``height × width × 3`` uint8: ``tile``-pixel renders cross-faded in both axes.

    Neighbouring tiles overlap by at least a quarter of a tile and each pixel is the weighted mean of
    the tiles covering it (weights :func:`_ramp`), so the renders' different colour jitters blend
    without a seam. Rows of tiles are streamed: finished rows go to the uint8 canvas at once.
    """
    overlap = tile // 4
    stride = tile - overlap
    starts_x = _tile_starts(width, tile, stride)
    starts_y = _tile_starts(height, tile, stride)
    th = min(tile, height)
    w_y = _ramp(th, overlap)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    pend_start, pend_acc, pend_w = 0, np.zeros((0, width, 3), np.float32), np.zeros(0, np.float32)
    for row, y0 in enumerate(starts_y):
        done = y0 - pend_start  # rows above y0 get no further tile
        if done > 0:
            canvas[pend_start:y0] = _to_uint8(pend_acc[:done] / pend_w[:done, None, None])
            pend_start, pend_acc, pend_w = y0, pend_acc[done:], pend_w[done:]
        grow = y0 + th - (pend_start + len(pend_w))
        if grow > 0:
            pend_acc = np.concatenate([pend_acc, np.zeros((grow, width, 3), np.float32)])
            pend_w = np.concatenate([pend_w, np.zeros(grow, np.float32)])
        strip = _tile_row(seed, scene, row, cover, width, th, tile, starts_x)
        pend_acc[y0 - pend_start:y0 - pend_start + th] += strip * w_y[:, None, None]
        pend_w[y0 - pend_start:y0 - pend_start + th] += w_y
    canvas[pend_start:pend_start + len(pend_w)] = _to_uint8(pend_acc / pend_w[:, None, None])
    return canvas


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Round and clip float pixels to uint8."""
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


# -- blocks ----------------------------------------------------------------------------------------


def block_scene(rng: np.random.Generator, scene_type: str, side: int, canvas_cover: str) -> SceneDescription:
    """Lay out a scene of ``scene_type`` at ``side`` pixels, like :func:`make_scene` but without position relations.

    The block's land cover is one its layout allows, other than the canvas cover where the layout
    allows another, so that the block's ground differs from its surroundings where it can.
    """
    build, covers = LAYOUTS[scene_type]
    choices = [c for c in covers if c != canvas_cover] or list(covers)
    background = choices[int(rng.integers(len(choices)))]
    builder = SceneBuilder(rng, side, scene_type, background)
    build(builder)
    return builder.scene


def names_scene(caption: str, scene_type: str) -> bool:
    """Whether ``caption`` names ``scene_type`` with one of the caption writer's noun phrases ("a parking lot")."""
    text = caption.lower()
    return any(phrase in text for phrase, _ in _SCENE_NPS[scene_type])


def block_captions(scene: SceneDescription, rng: np.random.Generator, n: int) -> list[str]:
    """``n`` true captions of a block, those naming its scene type first (see the module docstring)."""
    pool = make_captions(scene, rng, _CAPTION_POOL)
    named = [c for c in pool if names_scene(c, scene.scene_type)]
    return (named + [c for c in pool if c not in named])[:n]


def _make_block(seed: int, scene: int, index: int, plan: tuple[str, int, int, int], canvas: np.ndarray,
                canvas_cover: str, captions_per_block: int) -> SceneBlock:
    """Build, render and caption block ``index`` of a scene, pasting its pixels into ``canvas``."""
    scene_type, x, y, side = plan
    description = block_scene(_stream(seed, scene, _BLOCK_SCENE, index), scene_type, side, canvas_cover)
    canvas[y:y + side, x:x + side] = np.asarray(render_scene(description, _stream(seed, scene, _BLOCK_RENDER, index)))
    captions = block_captions(description, _stream(seed, scene, _BLOCK_CAPTIONS, index), captions_per_block)
    return SceneBlock(scene_type, x, y, side, description.background, len(description.objects), tuple(captions))


def make_large_scene(seed: int, scene: int, size_range: tuple[int, int], block_range: tuple[int, int],
                     blocks_per_scene: tuple[int, int], captions_per_block: int, block_gap: int = 48,
                     background_tile: int = 512) -> tuple[LargeScene, np.ndarray]:
    """Scene ``scene`` of ``seed``: its description and its ``height × width × 3`` uint8 pixels."""
    rng = _stream(seed, scene, _LAYOUT)
    width = int(rng.integers(size_range[0], size_range[1] + 1))
    height = int(rng.integers(size_range[0], size_range[1] + 1))
    cover = CANVAS_COVERS[int(rng.integers(len(CANVAS_COVERS)))]
    plans = plan_blocks(rng, width, height, block_range, blocks_per_scene, block_gap)
    canvas = render_background(seed, scene, cover, width, height, background_tile)
    blocks = [_make_block(seed, scene, b, plan, canvas, cover, captions_per_block) for b, plan in enumerate(plans)]
    return LargeScene(f"scene_{scene:05d}.png", width, height, cover, blocks), canvas


def compose_large_scene(seed: int, width: int, height: int, plans: Sequence[tuple[str, int, int, int]],
                        cover: str = "grass", captions_per_block: int = 1, background_tile: int = 512,
                        scene: int = 0) -> tuple[LargeScene, np.ndarray]:
    """A scene whose blocks are given: ``(scene_type, x, y, side)`` each, drawn as :func:`make_large_scene` draws.

    For tests and figures that need a known layout. Blocks must lie inside the canvas and not overlap.

    Raises:
        ConfigError: an unknown scene type or land cover, a block outside the canvas, or two blocks overlapping.
    """
    if cover not in CANVAS_COVERS:
        raise ConfigError(f"canvas land cover must be one of {', '.join(CANVAS_COVERS)}, got {cover!r}")
    boxes: list[tuple[int, int, int, int]] = []
    for scene_type, x, y, side in plans:
        box = (x, y, x + side, y + side)
        if scene_type not in SCENE_TYPES:
            raise ConfigError(f"unknown scene type {scene_type!r}; known: {', '.join(SCENE_TYPES)}")
        if x < 0 or y < 0 or box[2] > width or box[3] > height or _overlaps(box, boxes, 0):
            raise ConfigError(f"block {scene_type} at {box} lies outside the {width} × {height} canvas or overlaps another")
        boxes.append(box)
    canvas = render_background(seed, scene, cover, width, height, background_tile)
    blocks = [_make_block(seed, scene, b, tuple(plan), canvas, cover, captions_per_block)  # type: ignore[arg-type]
              for b, plan in enumerate(plans)]
    return LargeScene(f"scene_{scene:05d}.png", width, height, cover, blocks), canvas


# -- files -----------------------------------------------------------------------------------------


def _selo_samples(scenes: list[LargeScene]) -> list[LocalizationSample]:
    """One SeLo sample per caption of every block, its one polygon the block outline."""
    return [LocalizationSample(caption, s.image, [block.polygon])
            for s in scenes for block in s.blocks for caption in block.captions]


def _scene_record(scene: LargeScene) -> dict:
    """The scenes.json entry of one image."""
    return {
        "image": scene.image, "width": scene.width, "height": scene.height, "background": scene.background,
        "blocks": [{"scene_type": b.scene_type, "box": list(b.box), "polygon": b.polygon.tolist(), "background": b.background,
                    "objects": b.num_objects, "captions": list(b.captions)} for b in scene.blocks],
    }


_DESCRIPTION = (
    "Synthetic semantic-localisation benchmark written by rsitr (rsitr data scenes). Each image is a land-cover "
    "canvas with square blocks, each a synthetic scene of one type (at most one block per type per image). "
    "anno.json holds one sample per caption in the SeLo layout; its polygon's vertices are the block's corner "
    "pixels (a block at x of side s covers pixel columns x .. x+s-1, its vertices lie at x and x+s-1). "
    "Captions are true of their block."
)


def generate_large_scenes(
    out_dir: str | Path,
    num_scenes: int = 10,
    seed: int = 0,
    size_range: tuple[int, int] = (2000, 4000),
    block_range: tuple[int, int] = (400, 900),
    blocks_per_scene: tuple[int, int] = (4, 7),
    captions_per_block: int = 2,
    block_gap: int = 48,
    background_tile: int = 512,
    progress: bool = True,
) -> list[LargeScene]:
    """Write ``num_scenes`` large scenes with their SeLo annotations into ``out_dir`` and return them.

    See the module docstring for what a scene is and the files written. Deterministic: the same
    arguments give byte-identical files, and scene ``i`` does not depend on ``num_scenes``.

    Raises:
        ConfigError: an argument is out of range.
    """
    sizes, blocks, per_scene = _check_args(num_scenes, size_range, block_range, blocks_per_scene, captions_per_block,
                                           block_gap, background_tile)
    out = Path(out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    scenes: list[LargeScene] = []
    for i in progress_bar(range(num_scenes), desc="large scenes", unit="scene", enabled=progress):
        scene, pixels = make_large_scene(seed, i, sizes, blocks, per_scene, captions_per_block,
                                         block_gap, background_tile)
        save_image(image_dir / scene.image, pixels)
        scenes.append(scene)
    write_annotations(out / "anno.json", _selo_samples(scenes))
    write_json(out / "scenes.json", {
        "format": "rsitr-large-scenes-v1", "description": _DESCRIPTION, "seed": seed, "num_scenes": num_scenes,
        "size_range": list(sizes), "block_range": list(blocks), "blocks_per_scene": list(per_scene),
        "captions_per_block": captions_per_block, "block_gap": block_gap, "background_tile": background_tile,
        "scenes": [_scene_record(s) for s in scenes],
    })
    return scenes
