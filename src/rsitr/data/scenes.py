"""Scene class labels of remote-sensing images, recovered from the dataset conventions.

The retrieval datasets do not ship a label column in every layout, but their scene classes can be
recovered from how the images are named:

* RSITMD, NWPU-Captions and most of RSICD name each image ``<scene>_<number>.<ext>``
  (``baseballfield_452.tif`` is a ``baseballfield``).
* RSICD also has numeric names (``00013.jpg``); its release lists the members of every class in a
  ``classes/`` folder holding one ``<ClassName>.txt`` per class with one filename per line.
* UCM-Captions numbers its 2100 images 1..2100 in blocks of 100 per class, in the alphabetical
  order of the 21 UC Merced land-use classes, so image ``N`` is class ``(N - 1) // 100``.

Labels are lower-case class names without separators (``BaseballField.txt`` -> ``baseballfield``),
the spelling the filename prefixes already use. Readers attach labels only when every image of a
dataset gets one; a partial labelling is worse than none for the scene-aware metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from rsitr.errors import DatasetError

#: The 21 UC Merced land-use classes in alphabetical order, the order UCM-Captions numbers them in.
UCM_CLASSES: tuple[str, ...] = (
    "agricultural",
    "airplane",
    "baseballdiamond",
    "beach",
    "buildings",
    "chaparral",
    "denseresidential",
    "forest",
    "freeway",
    "golfcourse",
    "harbor",
    "intersection",
    "mediumresidential",
    "mobilehomepark",
    "overpass",
    "parkinglot",
    "river",
    "runway",
    "sparseresidential",
    "storagetanks",
    "tenniscourt",
)

#: Images per class in UC Merced (and hence in UCM-Captions).
UCM_IMAGES_PER_CLASS = 100

_PREFIX_RE = re.compile(r"^(?P<scene>.*[A-Za-z])_\d+$")


def _stem(filename: str) -> str:
    """Base name of ``filename`` without directories or extension (accepts / and \\ separators)."""
    return PurePosixPath(filename.replace("\\", "/")).stem


def _normalise_class(name: str) -> str:
    """Lower-case a class name so that ``BaseballField`` matches the ``baseballfield_`` prefix."""
    return name.strip().lower()


def scene_from_prefix(filename: str) -> str | None:
    """Scene of an RSITMD/RSICD/NWPU-style name ``<scene>_<number>.<ext>``, else ``None``.

    Example: ``scene_from_prefix("train/baseballfield_452.tif") == "baseballfield"``.
    """
    match = _PREFIX_RE.match(_stem(filename))
    return _normalise_class(match.group("scene")) if match else None


def ucm_scene(filename: str) -> str | None:
    """UC Merced class of UCM-Captions image ``N.<ext>`` (``(N - 1) // 100``), else ``None``.

    Only meaningful for UCM-Captions: Sydney-Captions also uses bare numbers with other classes.
    """
    stem = _stem(filename)
    if not stem.isdigit():
        return None
    number = int(stem)
    if not 1 <= number <= UCM_IMAGES_PER_CLASS * len(UCM_CLASSES):
        return None
    return UCM_CLASSES[(number - 1) // UCM_IMAGES_PER_CLASS]


def is_ucm(dataset_name: str | None) -> bool:
    """Whether a dataset name designates UCM-Captions (``ucm``, ``ucm_captions``, ``dataset_ucm``)."""
    return dataset_name is not None and "ucm" in dataset_name.lower()


def read_class_lists(folder: str | Path) -> dict[str, str]:
    """Map each filename listed in an RSICD-style ``classes/*.txt`` folder to its class.

    Each ``<ClassName>.txt`` lists the image filenames of that class, one per line.

    Raises:
        DatasetError: a filename is listed under two different classes.
    """
    mapping: dict[str, str] = {}
    for txt in sorted(Path(folder).glob("*.txt")):
        label = _normalise_class(txt.stem)
        for line in txt.read_text(encoding="utf-8-sig").split("\n"):
            name = line.strip()
            if not name:
                continue
            previous = mapping.setdefault(name, label)
            if previous != label:
                raise DatasetError(txt, f"{name} is also listed under class {previous!r}")
    return mapping


def find_class_lists(candidates: Iterable[str | Path]) -> dict[str, str]:
    """Read the first existing ``classes/`` folder among ``candidates``; empty dict if none."""
    for folder in candidates:
        folder = Path(folder)
        if folder.is_dir() and any(folder.glob("*.txt")):
            return read_class_lists(folder)
    return {}


def infer_scene_labels(
    filenames: Sequence[str],
    *,
    dataset_name: str | None = None,
    class_lists: dict[str, str] | None = None,
    explicit: Sequence[str | None] | None = None,
) -> list[str] | None:
    """Scene label of every image, or ``None`` when any image's label cannot be determined.

    Sources, first match wins per image: an explicit label from the annotation file
    (``explicit[i]``), the class lists (looked up by base name), the filename prefix, and for
    UCM-Captions (``dataset_name`` containing ``ucm``) the numeric block rule.
    """
    ucm = is_ucm(dataset_name)
    labels: list[str] = []
    for i, filename in enumerate(filenames):
        label = explicit[i] if explicit is not None else None
        if label is None and class_lists:
            label = class_lists.get(PurePosixPath(filename.replace("\\", "/")).name)
        if label is None:
            label = scene_from_prefix(filename)
        if label is None and ucm:
            label = ucm_scene(filename)
        if label is None:
            return None
        labels.append(_normalise_class(label))
    return labels if labels else None
