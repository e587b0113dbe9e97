"""Captions: grounded sentences written from a :class:`SceneDescription`.

A caption is a random template ("<opener> <scene> with <phrase>", "there are <phrase> <land
cover>" ...) filled with noun phrases built from the scene itself: counts, colours and sizes are
read off its objects and relations are only those the layout recorded as true of every object of
a class. So every statement a caption makes holds in its image, which the tests check by parsing
the captions with :data:`CLASS_NOUNS` and :data:`NUMBER_WORDS`.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from rsitr.data.synth.scene import NUMBER_WORDS, OBJECT_CLASSES, SceneDescription
from rsitr.errors import ConfigError

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

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_MANY_WORDS = ("many", "lots of", "a large number of", "plenty of")

#: Scene type -> (noun phrase, preposition that places something in it).
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

#: The class a caption of each scene type usually starts with (None: a layout feature may lead).
_PRIMARY = {
    "airport": "plane", "harbor": "ship", "residential": "building", "parking": "car", "storage": "storage_tank",
    "industrial": "building", "farmland": None, "forest": None, "desert": None, "river": None,
}

_FEATURE = "__feature__"  # pseudo-class: "a layout feature" when choosing what a caption is about
_TEMPLATES = 9  # number of sentence templates of _fill_template


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
    """A true noun phrase about all objects of class ``cls``, with counts, colours and sizes.

    One colour is named as an adjective; two or three as colour groups ("two red and a white
    ship"); more as "of different colours". A size is only named when all objects share it.
    """
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
    pool: list[str] = classes + ([_FEATURE] if scene.features else [])
    if primary in classes and rng.random() < 0.7:
        first = primary
    elif primary is None and scene.features and rng.random() < 0.5:
        first = _FEATURE
    else:
        first = _pick(rng, pool)
    rest = [c for c in pool if c != first]
    second = _pick(rng, rest) if rest and rng.random() < 0.6 else None

    def phrase(key: str) -> _Phrase:
        return _feature_phrase(rng, scene) if key == _FEATURE else _object_phrase(rng, scene, key)

    return phrase(first), (phrase(second) if second else None)


def _with_rel(p: _Phrase) -> str:
    """Phrase text followed by its relation, if any."""
    return f"{p.text} {p.relation}" if p.relation else p.text


def _setting_phrase(rng: np.random.Generator, scene: SceneDescription, g1: _Phrase, drawn: str) -> str:
    """Where ``g1`` is: the land-cover phrase ``drawn`` earlier, redrawn when it would not read well.

    A relation already mentioning the land cover rules out repeating it ("surrounded by trees
    surrounded by grassland"), and ships are on the water, never on the land cover.
    """
    setting = drawn
    if g1.relation:
        options = [p for p in _BACKGROUND_PHRASES[scene.background]
                   if p.split()[0] in ("on", "in") or p.split()[0] not in g1.relation.split()]
        setting = _pick(rng, options)
    if g1.on_water:
        setting = _pick(rng, _WATER_PHRASES)
    return setting


def _fill_template(rng: np.random.Generator, template: int, opener: str, scene_np: str, prep: str, setting: str,
                   g1: _Phrase, g2: _Phrase | None) -> str:
    """Sentence ``template`` (0..8) with its slots filled; templates needing a missing slot fall back to 8."""
    be = "are" if g1.plural else "is"
    and_ = "as well as" if " and " in g1.text else "and"
    if template == 0:
        return f"{opener} {scene_np} with {_with_rel(g1)}"
    if template == 1 and g2:
        return f"{opener} {scene_np} with {_with_rel(g1)} {and_} {g2.text}"
    if template == 2 and g1.relation:
        return f"{g1.text} {be} {g1.relation} {prep} {scene_np}"
    if template == 3:
        return f"there {be} {_with_rel(g1)} {setting}"
    if template == 4 and g2:
        return f"{scene_np} {_pick(rng, ('contains', 'has', 'includes'))} {g1.text} {and_} {_with_rel(g2)}"
    if template == 5 and g2:
        return f"{_with_rel(g1)} {and_} {g2.text} can be seen {prep} {scene_np}"
    if template == 6:
        return f"{_with_rel(g1)} {setting}"
    if template == 7:
        return f"{scene_np} {setting} with {_with_rel(g1)}"
    return f"{opener} {_with_rel(g1)} {prep} {scene_np}"


def _as_sentence(text: str) -> str:
    """Single spaces, a capital first letter and a full stop."""
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] + "."


def _one_caption(rng: np.random.Generator, scene: SceneDescription) -> str:
    """One caption from a random template, filled with true phrases."""
    scene_np, prep = _SCENE_NPS[scene.scene_type][int(rng.integers(3))]
    drawn_setting = _pick(rng, _BACKGROUND_PHRASES[scene.background])  # drawn even if replaced: fixes the stream
    opener = _pick(rng, _OPENERS)
    g1, g2 = _groups(rng, scene)
    template = int(rng.integers(_TEMPLATES))
    setting = _setting_phrase(rng, scene, g1, drawn_setting)
    if not g1.on_water and g1.feature and scene.scene_type in ("forest", "desert") and template in (3, 6, 7):
        template = 0  # "sand dunes on yellow sand": the feature already is the land cover
    return _as_sentence(_fill_template(rng, template, opener, scene_np, prep, setting, g1, g2))


def _plain_captions(scene_type: str) -> list[str]:
    """The 24 "<Opener> <scene>." sentences of a scene type, the fallback when templates run dry."""
    return [f"{opener[0].upper()}{opener[1:]} {scene_np}." for opener in _OPENERS for scene_np, _ in _SCENE_NPS[scene_type]]


def make_captions(scene: SceneDescription, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct captions of ``scene``; every count, colour, size and relation is true.

    Random templates are tried until ``n`` different sentences exist; if a sparse scene ever runs
    out of variety, plain "<opener> <scene>." sentences (24 distinct per scene type) fill up.

    Raises:
        ConfigError: ``n`` is more than even the plain sentences can make distinct.
    """
    captions: list[str] = []
    for _ in range(40 * n):
        if len(captions) == n:
            return captions
        c = _one_caption(rng, scene)
        if c not in captions:
            captions.append(c)
    for c in _plain_captions(scene.scene_type):
        if len(captions) < n and c not in captions:
            captions.append(c)
    if len(captions) < n:
        raise ConfigError(f"captions_per_image={n} is more than the synthetic generator can vary")
    return captions
