"""Scene sampling: the random streams of an image and :func:`make_scene`, its scene description.

Every image has its own random streams, derived from ``(seed, index, stream)``, so image ``i``
is the same whether 10 or 1000 images are generated. Stream 0 samples the scene, stream 1 is the
renderer's and stream 2 the caption writer's; stream 99 of block ``b`` orders the scene types of
images ``10 b .. 10 b + 9``.
"""

from __future__ import annotations

import numpy as np

from rsitr.data.synth.layouts import LAYOUTS
from rsitr.data.synth.placement import SceneBuilder
from rsitr.data.synth.scene import OBJECT_CLASSES, SCENE_TYPES, SceneDescription

#: Stream numbers of :func:`image_rng`.
SCENE_STREAM, RENDER_STREAM, CAPTION_STREAM, TYPE_ORDER_STREAM = 0, 1, 2, 99


def image_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of image ``index``: independent of every other image."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def scene_type_of(seed: int, index: int) -> str:
    """Scene type of image ``index``: a seeded order of ``SCENE_TYPES`` per block of ten images.

    Every type is then equally frequent and any ten consecutive images (from a multiple of ten)
    cover all types.
    """
    block = index // len(SCENE_TYPES)
    order = image_rng(seed, block, TYPE_ORDER_STREAM).permutation(len(SCENE_TYPES))
    return SCENE_TYPES[int(order[index % len(SCENE_TYPES)])]


def make_scene(seed: int, index: int, image_size: int = 128) -> SceneDescription:
    """Sample the scene description of image ``index`` for ``seed``.

    The scene type comes from :func:`scene_type_of`; the land cover and everything on it from the
    image's scene stream.
    """
    scene_type = scene_type_of(seed, index)
    rng = image_rng(seed, index, SCENE_STREAM)
    build, backgrounds = LAYOUTS[scene_type]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    builder = SceneBuilder(rng, image_size, scene_type, background)
    build(builder)
    add_position_relations(builder.scene)
    return builder.scene


def add_position_relations(scene: SceneDescription) -> None:
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
