"""Labelled images for scene classification: an ImageFolder tree, or a retrieval dataset's scenes.

Scene datasets (AID, UC Merced, NWPU-RESISC45, WHU-RS19 ...) are distributed as one folder per
class::

    root/airport/airport_1.jpg
    root/airport/airport_2.jpg
    root/beach/beach_1.jpg
    ...

Class names are the sorted folder names and a class's label is its position in that list. Images
may sit in nested folders below their class folder; files without an image extension and hidden
entries (names starting with ".") are ignored. A root whose only sub-folders are ``train/`` and
optionally ``val/`` (and ``test/``, which is never read) holds a ready-made split, each part an
ImageFolder tree of its own; otherwise a seeded, stratified fraction of each class is held out
for validation.

Retrieval datasets whose images carry scene labels (RSITMD, RSICD, UCM-Captions, NWPU-Captions,
see :mod:`rsitr.data.scenes`) provide the same thing through :func:`scene_classification_data`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rsitr.data.dataset import RetrievalDataset
from rsitr.errors import DatasetError, UnknownLayoutError

#: File extensions read as images (compared case-insensitively).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif"})

#: Folder names that mark a ready-made split at the root of a tree.
SPLIT_FOLDERS = ("train", "val", "test")


@dataclass
class LabelledImages:
    """Image paths with an integer label each, and the class names the labels index."""

    classes: list[str]
    paths: list[Path]
    labels: list[int]


@dataclass
class ClassificationData:
    """Training and validation images of a scene-classification task.

    Attributes:
        classes: class names; label ``k`` is ``classes[k]``.
        train_paths, train_labels: training images and their labels.
        val_paths, val_labels: validation images and their labels (may be empty).
        source: where the data came from, for logs and the saved checkpoint's description.
        dropped_val: validation images left out because their class has no training image.
    """

    classes: list[str]
    train_paths: list[Path]
    train_labels: list[int]
    val_paths: list[Path] = field(default_factory=list)
    val_labels: list[int] = field(default_factory=list)
    source: str = ""
    dropped_val: int = 0

    def __post_init__(self) -> None:
        if len(self.train_paths) != len(self.train_labels):
            raise ValueError("train_paths and train_labels differ in length")
        if len(self.val_paths) != len(self.val_labels):
            raise ValueError("val_paths and val_labels differ in length")
        n = len(self.classes)
        if any(not 0 <= label < n for label in [*self.train_labels, *self.val_labels]):
            raise ValueError(f"labels must lie in [0, {n})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self, split: str = "train") -> list[int]:
        """Images per class in ``split`` (``"train"`` or ``"val"``)."""
        labels = self.train_labels if split == "train" else self.val_labels
        return np.bincount(np.asarray(labels, dtype=np.int64), minlength=self.num_classes).tolist()

    def summary(self) -> str:
        """One line: classes, images per split, and the smallest and largest class in train."""
        counts = self.counts("train")
        return (f"{self.num_classes} classes, {len(self.train_paths)} train / {len(self.val_paths)} val images "
                f"(train images per class {min(counts)}..{max(counts)})")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a visible file with one of ``IMAGE_EXTENSIONS``."""
    return path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def _subfolders(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _images_below(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, in sorted path order, skipping hidden folders."""
    found = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if all(not part.startswith(".") for part in relative) and is_image_file(path):
            found.append(path)
    return found


def _check_root(root: Path) -> list[Path]:
    """The class folders of ``root``; DatasetError if it is missing, empty or holds none."""
    if not root.is_dir():
        raise DatasetError(root, "no such folder" if not root.exists() else "not a folder")
    entries = [p for p in root.iterdir() if _visible(p)]
    if not entries:
        raise DatasetError(root, "empty folder (expected one sub-folder of images per class)")
    folders = _subfolders(root)
    if not folders:
        raise DatasetError(root, "no class folders here, only files (expected one sub-folder of images per class)")
    return folders


def read_imagefolder(root: str | Path, classes: Sequence[str] | None = None) -> LabelledImages:
    """Read an ImageFolder tree: class names, image paths and labels.

    Args:
        root: folder holding one sub-folder per class.
        classes: fixed class list (e.g. a training part's classes when reading a ``val/`` part);
            a class folder not in it is an error, a class of it without a folder is fine.
            ``None``: the sorted folder names.

    Raises:
        DatasetError: ``root`` is missing, empty or has no class folders; a class folder has no
            image file; a folder is not one of ``classes``.
    """
    root = Path(root)
    folders = _check_root(root)
    names = [p.name for p in folders]
    class_list = list(names) if classes is None else list(classes)
    index = {name: k for k, name in enumerate(class_list)}
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if folder.name not in index:
            raise DatasetError(folder, f"class {folder.name!r} does not occur in the training images")
        images = _images_below(folder)
        if not images:
            wanted = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(folder, f"no image files in class folder (looked for {wanted})")
        paths += images
        labels += [index[folder.name]] * len(images)
    return LabelledImages(classes=class_list, paths=paths, labels=labels)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of a seeded, per-class train/validation split.

    Each class sends ``round(n * val_fraction)`` of its ``n`` images to validation, but at least
    one when ``val_fraction > 0`` and never all of them (a class with one image stays in train).
    Which images go is a seeded permutation per class, so the split is a function of ``labels``,
    ``val_fraction`` and ``seed`` only. Both lists come back sorted.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=np.int64)
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels_arr):
        members = np.flatnonzero(labels_arr == label)
        order = members[rng.permutation(len(members))]
        n_val = round(len(members) * val_fraction)
        if val_fraction > 0:
            n_val = max(1, n_val)
        n_val = min(n_val, len(members) - 1)
        val += order[:n_val].tolist()
        train += order[n_val:].tolist()
    return sorted(train), sorted(val)


def _ready_made_split(root: Path) -> bool:
    """Whether ``root``'s sub-folders are split folders (``train/`` and optionally ``val/``, ``test/``)."""
    names = {p.name for p in _subfolders(root)} if root.is_dir() else set()
    return "train" in names and names <= set(SPLIT_FOLDERS)


def load_imagefolder(root: str | Path, val_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """Training and validation images of an ImageFolder tree.

    With ready-made ``train/`` and ``val/`` sub-folders those are used (classes from ``train/``);
    with ``train/`` alone, or a plain tree, ``val_fraction`` of each class is held out by
    :func:`stratified_split` with ``seed``. ``val_fraction=0`` trains on everything.

    Raises:
        DatasetError: see :func:`read_imagefolder`.
    """
    root = Path(root)
    if _ready_made_split(root):
        train = read_imagefolder(root / "train")
        if (root / "val").is_dir():
            val = read_imagefolder(root / "val", classes=train.classes)
            return ClassificationData(train.classes, train.paths, train.labels, val.paths, val.labels,
                                      source=f"{root} (train/ and val/ folders)")
        tree, source = train, f"{root / 'train'} ({val_fraction:g} held out per class, seed {seed})"
    else:
        tree, source = read_imagefolder(root), f"{root} ({val_fraction:g} held out per class, seed {seed})"
    train_ids, val_ids = stratified_split(tree.labels, val_fraction, seed)
    return ClassificationData(
        classes=tree.classes,
        train_paths=[tree.paths[i] for i in train_ids],
        train_labels=[tree.labels[i] for i in train_ids],
        val_paths=[tree.paths[i] for i in val_ids],
        val_labels=[tree.labels[i] for i in val_ids],
        source=source,
    )


def scene_classification_data(dataset: RetrievalDataset, train_split: str = "train", val_split: str | None = "val",
                              val_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """Scene classification from a retrieval dataset's images and ``scene_labels``.

    The classes are the labels seen in ``train_split`` (sorted). Validation images come from
    ``val_split``; those whose class has no training image cannot be scored and are dropped with a
    warning (their number is kept in ``dropped_val``). With ``val_split=None`` a stratified
    ``val_fraction`` of the training split is held out instead (for datasets without a val split).
    Test images are never used.

    Raises:
        DatasetError: the dataset has no scene labels (naming the dataset's file).
        SplitNotFoundError: a requested split is absent.
    """
    where = dataset.source if dataset.source is not None else dataset.image_dir
    if dataset.scene_labels is None:
        raise DatasetError(where, f"dataset {dataset.name!r} has no scene labels, so it cannot train a scene "
                                  "classifier (use an ImageFolder tree of labelled images instead)")
    labels = dataset.scene_labels
    train_ids = dataset.split_indices(train_split)
    classes = sorted({labels[i] for i in train_ids})
    index = {name: k for k, name in enumerate(classes)}
    if val_split is None:
        keep, held = stratified_split([index[labels[i]] for i in train_ids], val_fraction, seed)
        val_ids, train_ids, dropped = [train_ids[k] for k in held], [train_ids[k] for k in keep], 0
        source = f"{where} ({dataset.name} {train_split} split, {val_fraction:g} held out per class, seed {seed})"
    else:
        candidates = dataset.split_indices(val_split)
        val_ids = [i for i in candidates if labels[i] in index]
        dropped = len(candidates) - len(val_ids)
        if dropped:
            warnings.warn(f"{where}: {dropped} of {len(candidates)} {val_split!r} images dropped: their scene "
                          f"class has no {train_split!r} image", stacklevel=2)
        source = f"{where} ({dataset.name} {train_split}/{val_split} splits)"
    return ClassificationData(
        classes=classes,
        train_paths=[dataset.image_path(i) for i in train_ids],
        train_labels=[index[labels[i]] for i in train_ids],
        val_paths=[dataset.image_path(i) for i in val_ids],
        val_labels=[index[labels[i]] for i in val_ids],
        source=source,
        dropped_val=dropped,
    )


def load_classification_data(path: str | Path, val_fraction: float = 0.2, seed: int = 0, train_split: str = "train",
                             val_split: str | None = "val", hold_out: str = "random") -> ClassificationData:
    """Labelled images from ``path``: a retrieval dataset with scene labels, or else an ImageFolder tree.

    A path that :func:`rsitr.data.loader.detect_layout` recognises (Karpathy json, precomp, PIR)
    goes through :func:`scene_classification_data` with ``train_split``/``val_split``. A missing
    val split (or ``val_split=None``) holds out ``val_fraction`` of each class of train by
    :func:`rsitr.data.splits.carve_selection` with ``seed`` and ``hold_out`` (``random`` or
    ``block``): exactly the selection split a retrieval run carves with the same share, seed and
    mode, so the backbone never sees the labels of the images that later choose the retrieval
    model's epoch. Any other folder is read by :func:`load_imagefolder` with ``val_fraction`` and ``seed``.
    """
    from rsitr.data.loader import detect_layout, load_dataset
    from rsitr.data.splits import carve_selection

    path = Path(path)
    try:
        detect_layout(path)
    except UnknownLayoutError:
        if path.is_dir():
            return load_imagefolder(path, val_fraction=val_fraction, seed=seed)
        raise
    dataset = load_dataset(path)
    if val_split is None or val_split not in dataset.splits():
        dataset = carve_selection(dataset, val_fraction, seed, source=train_split, name="select", mode=hold_out)
        val_split = "select"
    return scene_classification_data(dataset, train_split, val_split, val_fraction=val_fraction, seed=seed)
