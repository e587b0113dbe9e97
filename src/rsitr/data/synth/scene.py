"""What a synthetic scene is: the class vocabularies and the :class:`SceneDescription` data model.

Every other stage reads only these types: the samplers (:mod:`.placement`, :mod:`.layouts`,
:mod:`.sampling`) fill a :class:`SceneDescription`, the renderer draws it and the caption writer
describes it, which is why every caption is true of its image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

#: Number words used for exact counts; larger groups are described as "many".
#: Shared by the layouts (feature phrases such as "two piers") and the captions.
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
