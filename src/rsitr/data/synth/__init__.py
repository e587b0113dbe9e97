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

:func:`generate_large_scenes` (:mod:`.large_scenes`) composes such scenes into large images with
ground-truth regions, a semantic-localisation benchmark in the SeLo ``anno.json`` layout.

Modules: :mod:`.scene` (vocabularies and the data model), :mod:`.geometry` (shapes, boxes,
masks), :mod:`.placement` (the scene builder that places objects), :mod:`.layouts` (one layout
per scene type), :mod:`.sampling` (random streams and :func:`make_scene`), :mod:`.render`,
:mod:`.captions` and :mod:`.writer` (:func:`generate_synthetic`).

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

from rsitr.data.synth.captions import CLASS_NOUNS, make_captions
from rsitr.data.synth.large_scenes import LargeScene, SceneBlock, generate_large_scenes
from rsitr.data.synth.render import render_scene
from rsitr.data.synth.sampling import make_scene
from rsitr.data.synth.scene import (
    BACKGROUNDS,
    NUMBER_WORDS,
    OBJECT_CLASSES,
    PALETTES,
    SCENE_TYPES,
    Region,
    SceneDescription,
    SceneObject,
)
from rsitr.data.synth.writer import assign_splits, generate_synthetic
from rsitr.text import tokenize  # the caption tokenizer; kept importable from here for old callers

__all__ = [
    "BACKGROUNDS",
    "CLASS_NOUNS",
    "NUMBER_WORDS",
    "OBJECT_CLASSES",
    "PALETTES",
    "SCENE_TYPES",
    "LargeScene",
    "Region",
    "SceneBlock",
    "SceneDescription",
    "SceneObject",
    "assign_splits",
    "generate_large_scenes",
    "generate_synthetic",
    "make_captions",
    "make_scene",
    "render_scene",
    "tokenize",
]
