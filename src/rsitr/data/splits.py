"""Which images are in which split: a selection split carved from train, random reallocations, and
the assignment file a run stores.

Two rules keep reported numbers honest:

* **A reported split is never the split a checkpoint was chosen on.** A dataset with train, val
  and test selects on val and reports test. A dataset with train and val only (the UCM-Captions
  and Sydney-Captions releases) needs a third split to choose on: :func:`carve_selection` moves a
  seeded share of each scene class of train (all of train when the dataset has no scene labels)
  into a new split, the *selection split*, and val stays the report split. The carve is the one
  :func:`rsitr.data.imagefolder.stratified_split` makes for scene-classification pretraining with
  the same share and seed, so a backbone pretrained with ``rsitr pretrain --val-split none`` has
  never seen the selection images' labels either.
* **DOVE's Table I protocol** (Sec. IV-A) reshuffles train and val at random and averages three
  runs. :func:`reallocate` pools the images of the given splits and deals them out again, image
  by image, keeping every split's size; captions follow their image.

A run stores the assignment it trained with (:func:`write_assignment`), by image file name, so it
is evaluated on exactly those splits however the code that derives them changes later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.imagefolder import stratified_split
from rsitr.errors import CheckpointError, ConfigError
from rsitr.io import read_json, write_json

ASSIGNMENT_FORMAT = "rsitr-splits-v1"


CARVE_MODES = ("random", "block")


def carve_selection(dataset: RetrievalDataset, fraction: float, seed: int = 0, source: str = "train",
                    name: str = "select", mode: str = "random") -> RetrievalDataset:
    """A copy of ``dataset`` where a ``fraction`` of ``source`` images form split ``name``.

    Stratified by scene label when the dataset has labels (each class gives ``round(n * fraction)``
    of its ``n`` images, at least one, never all); otherwise drawn from all of ``source``.
    ``mode="random"`` draws the images of each class with ``seed``; ``mode="block"`` takes the
    *last* images of each class in dataset order, the way the UCM-Captions and Sydney releases cut
    val and test (a run of consecutive image numbers per class). Consecutive images of such
    datasets are often neighbouring tiles of one scene, so a random carve leaves near-twins of the
    selection images in train and makes the selection split easier than val; a block does not.
    """
    if mode not in CARVE_MODES:
        raise ConfigError(f"the selection split's carve mode must be one of {', '.join(CARVE_MODES)}, got {mode!r}")
    if not 0 < fraction < 1:
        raise ConfigError(f"the selection split's share of {source!r} must be in (0, 1), got {fraction}")
    if name in dataset.splits():
        raise ConfigError(f"dataset {dataset.name!r} already has a {name!r} split; carve the selection split "
                          f"under another name, or select on {name!r} as it is")
    source_ids = dataset.split_indices(source)
    if dataset.scene_labels is not None:
        classes = sorted({dataset.scene_labels[i] for i in source_ids})
        index = {label: k for k, label in enumerate(classes)}
        labels = [index[dataset.scene_labels[i]] for i in source_ids]
    else:
        labels = [0] * len(source_ids)
    if mode == "random":
        _, held = stratified_split(labels, fraction, seed)
    else:
        held = _last_of_each_class(labels, fraction)
    splits = list(dataset.image_splits)
    for k in held:
        splits[source_ids[k]] = name
    return dataclasses.replace(dataset, image_splits=splits)


def _last_of_each_class(labels: Sequence[int], fraction: float) -> list[int]:
    """Positions of the last ``round(n * fraction)`` items (at least one, never all) of each class."""
    held: list[int] = []
    positions = np.asarray(labels, dtype=np.int64)
    for label in np.unique(positions):
        members = np.flatnonzero(positions == label)
        count = min(max(1, round(len(members) * fraction)), len(members) - 1)
        held += members[len(members) - count :].tolist()
    return sorted(held)


def reallocate(dataset: RetrievalDataset, splits: Sequence[str], seed: int) -> RetrievalDataset:
    """A copy of ``dataset`` whose ``splits`` images are dealt out again at random, sizes kept.

    The images of the named splits are pooled in dataset order, permuted with ``seed`` and cut into
    consecutive pieces of the original sizes, in the order ``splits`` names them.
    """
    if len(set(splits)) < 2:
        raise ConfigError(f"reallocating needs at least two distinct splits, got {list(splits)}")
    pools = [dataset.split_indices(s) for s in splits]
    pooled = np.array(sorted(i for pool in pools for i in pool), dtype=np.int64)
    order = pooled[np.random.default_rng(seed).permutation(len(pooled))]
    new = list(dataset.image_splits)
    start = 0
    for split, pool in zip(splits, pools, strict=True):
        for image in order[start : start + len(pool)]:
            new[int(image)] = split
        start += len(pool)
    return dataclasses.replace(dataset, image_splits=new)


def assignment_of(dataset: RetrievalDataset) -> dict[str, object]:
    """The split of every image, by file name, as a JSON-ready dict."""
    return {"format": ASSIGNMENT_FORMAT, "dataset": dataset.name,
            "splits": {split: [dataset.image_files[i] for i in dataset.split_indices(split)]
                       for split in dataset.splits()}}


def write_assignment(path: str | Path, dataset: RetrievalDataset) -> None:
    """Store the split of every image of ``dataset`` in ``path`` (atomically)."""
    write_json(path, assignment_of(dataset))


def apply_assignment(dataset: RetrievalDataset, path: str | Path) -> RetrievalDataset:
    """``dataset`` with the splits stored in ``path``; a one-line error if they do not fit it."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != ASSIGNMENT_FORMAT or not isinstance(data.get("splits"), dict):
        raise CheckpointError(path, f"not a split assignment (expected format {ASSIGNMENT_FORMAT!r})")
    index = {name: i for i, name in enumerate(dataset.image_files)}
    splits: list[str | None] = [None] * dataset.num_images
    for split, files in data["splits"].items():
        for name in files:
            if name not in index:
                raise CheckpointError(path, f"image {name!r} of split {split!r} is not in dataset {dataset.name!r}")
            splits[index[name]] = str(split)
    missing = [dataset.image_files[i] for i, s in enumerate(splits) if s is None]
    if missing:
        raise CheckpointError(path, f"{len(missing)} images of dataset {dataset.name!r} have no split "
                                    f"(first: {missing[0]!r}); the dataset changed since the run")
    return dataclasses.replace(dataset, image_splits=[str(s) for s in splits])
