"""Mosaics of real scene chips with ground-truth cells: a localisation benchmark from a captioned dataset.

Semantic localisation (SeLo, Yuan et al. 2022) needs large images with annotated regions; the
public set is 22 images. :func:`build_mosaics` makes more from any Karpathy-layout dataset with
scene labels (UCM-Captions: 21 classes, 256 × 256 images): each mosaic is a ``rows × cols`` grid of
images of one split, all of *distinct* scene classes, so a sentence about one class has exactly one
true cell. For each mosaic, ``queries_per_mosaic`` distinct cells are drawn and one of each cell's
captions is the query; its SeLo polygon is the cell square.

Choices a reviewer should know about:

* **Distinct classes, not distinct meanings.** Distinct labels make the answer unique at class
  level; captions that are true of similar classes too (UCM's dense / medium / sparse residential,
  "buildings") are kept as the dataset wrote them, so a careful evaluation also reports which class
  got the heat.
* **Cell size.** Every cell is ``cell_size`` pixels square; ``None`` takes the side of the split's
  first image (256 for UCM). An image of another size is resized (bilinear) to the cell and marked
  ``"resized": true`` in ``mosaics.json``; all others are copied pixel for pixel.
* **Image format.** PNG by default (lossless, so cells are exactly the dataset's decoded pixels);
  ``image_format="jpg"`` writes JPEG at quality 95 with no chroma subsampling, a fifth of the size.
* **Polygon vertices are the cell's corner pixels:** the cell in row ``r``, column ``c`` covers
  columns ``c·s .. c·s + s - 1``, and those are its polygon's x coordinates (likewise for y), the
  convention of :func:`rsitr.localization_metrics.polygon_mask`, which then fills exactly the cell.
* **Sampling.** Mosaic ``m`` has its own random stream ``(seed, m)``: a seeded sample of
  ``rows·cols`` classes without replacement laid out row-major, one image per class drawn uniformly
  from the split, then the query cells (without replacement) and one caption of each. Mosaic ``m``
  does not depend on ``count``; an image may appear in several mosaics.

Files written into ``out_dir``::

    images/mosaic_00000.png ...
    anno.json      SeLo layout, one sample per query: [{"caption", "jpg_name", "points": [[[x, y] x 4]]}]
    mosaics.json   {"format": "rsitr-mosaics-v1", "dataset", "split", "rows", "cols", "cell_size", "seed",
                    "image_format", "mosaics": [{"image", "width", "height",
                    "cells": [{"row", "col", "box", "image", "label", "resized"}],
                    "queries": [{"cell", "caption"}]}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import read_image
from rsitr.data.loader import load_dataset
from rsitr.data.synth.large_scenes import square_polygon
from rsitr.errors import ConfigError, DatasetError
from rsitr.io import save_image, write_json
from rsitr.localization_metrics import LocalizationSample, write_annotations
from rsitr.progress import progress_bar

#: Accepted values of ``image_format`` and their file suffixes.
IMAGE_FORMATS: dict[str, str] = {"png": ".png", "jpg": ".jpg"}

#: First element of every random-stream key of a mosaic.
_TAG = 5_150_021


@dataclass(frozen=True)
class MosaicCell:
    """One cell: the dataset image at row ``row``, column ``col`` of a mosaic."""

    row: int
    col: int
    side: int
    image: str
    label: str
    resized: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)`` in the mosaic, ``x2``/``y2`` exclusive."""
        x, y = self.col * self.side, self.row * self.side
        return (x, y, x + self.side, y + self.side)

    @property
    def polygon(self) -> np.ndarray:
        """The cell square, ``(4, 2)`` float64 ``(x, y)``: its corner pixels, clockwise from the top left."""
        return square_polygon(self.col * self.side, self.row * self.side, self.side)


@dataclass
class Mosaic:
    """One written mosaic: its file, cells (row-major) and queries ``(cell index, caption)``."""

    image: str
    rows: int
    cols: int
    cells: list[MosaicCell] = field(default_factory=list)
    queries: list[tuple[int, str]] = field(default_factory=list)


def _check_args(rows: int, cols: int, count: int, queries_per_mosaic: int, cell_size: int | None, image_format: str) -> None:
    """Reject arguments that cannot give a valid benchmark, each with a one-line ConfigError."""
    if rows < 1 or cols < 1:
        raise ConfigError(f"rows and cols must be at least 1, got {rows} x {cols}")
    if count < 1:
        raise ConfigError(f"count must be at least 1, got {count}")
    if not 1 <= queries_per_mosaic <= rows * cols:
        raise ConfigError(f"queries_per_mosaic must be 1 to rows*cols = {rows * cols}, got {queries_per_mosaic}")
    if cell_size is not None and cell_size < 8:
        raise ConfigError(f"cell_size must be at least 8 pixels, got {cell_size}")
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")


def class_images(dataset: RetrievalDataset, split: str, cells: int) -> dict[str, list[int]]:
    """Image ids of ``split`` per scene class, classes sorted by name; only images with a caption count.

    Raises:
        DatasetError: the dataset has no scene labels, or the split has fewer classes than ``cells``.
        SplitNotFoundError: the dataset has no such split.
    """
    source = dataset.source or dataset.image_dir
    if dataset.scene_labels is None:
        raise DatasetError(source, "has no scene labels; mosaics need a class per image to keep cells distinct")
    by_class: dict[str, list[int]] = {}
    captioned = set(dataset.caption_image.tolist())
    for i in dataset.split_indices(split):
        if i in captioned:
            by_class.setdefault(dataset.scene_labels[i], []).append(i)
    if len(by_class) < cells:
        raise DatasetError(source, f"split {split!r} has {len(by_class)} scene classes, fewer than the {cells} cells of a "
                                   "mosaic (each cell needs a distinct class); use fewer rows or columns")
    return {label: by_class[label] for label in sorted(by_class)}


def _cell_pixels(path: Path, side: int) -> tuple[np.ndarray, bool]:
    """The image at ``path`` as ``side × side × 3`` uint8, and whether it had to be resized."""
    img = read_image(path)
    if img.size == (side, side):
        return np.asarray(img), False
    return np.asarray(img.resize((side, side), Image.Resampling.BILINEAR)), True


def _default_side(dataset: RetrievalDataset, first: int) -> int:
    """Cell side when none is given: the width of image ``first`` (the split's first image)."""
    return read_image(dataset.image_path(first)).size[0]


def make_mosaic(dataset: RetrievalDataset, classes: dict[str, list[int]], index: int, rows: int, cols: int,
                queries: int, side: int, seed: int, suffix: str) -> tuple[Mosaic, np.ndarray]:
    """Mosaic ``index``: its description and pixels (see the module docstring for the sampling)."""
    rng = np.random.default_rng([_TAG, int(seed), int(index)])
    names = list(classes)
    chosen = [names[int(i)] for i in rng.permutation(len(names))[: rows * cols]]
    picks = [classes[label][int(rng.integers(len(classes[label])))] for label in chosen]
    pixels = np.zeros((rows * side, cols * side, 3), dtype=np.uint8)
    mosaic = Mosaic(f"mosaic_{index:05d}{suffix}", rows, cols)
    for k, (label, image_id) in enumerate(zip(chosen, picks)):
        cell_pixels, resized = _cell_pixels(dataset.image_path(image_id), side)
        cell = MosaicCell(k // cols, k % cols, side, dataset.image_files[image_id], label, resized)
        x1, y1, x2, y2 = cell.box
        pixels[y1:y2, x1:x2] = cell_pixels
        mosaic.cells.append(cell)
    for k in sorted(int(c) for c in rng.choice(rows * cols, size=queries, replace=False)):
        caption_ids = dataset.captions_of(picks[k])
        mosaic.queries.append((k, dataset.captions[caption_ids[int(rng.integers(len(caption_ids)))]]))
    return mosaic, pixels


def _save(pixels: np.ndarray, path: Path, image_format: str) -> None:
    """Write a mosaic atomically: PNG, or JPEG at quality 95 without chroma subsampling."""
    if image_format == "jpg":
        save_image(path, pixels, "JPEG", quality=95, subsampling=0)
    else:
        save_image(path, pixels)


def _record(m: Mosaic) -> dict:
    """The mosaics.json entry of one mosaic."""
    side = m.cells[0].side
    return {
        "image": m.image, "width": m.cols * side, "height": m.rows * side,
        "cells": [{"row": c.row, "col": c.col, "box": list(c.box), "image": c.image, "label": c.label, "resized": c.resized}
                  for c in m.cells],
        "queries": [{"cell": k, "caption": caption} for k, caption in m.queries],
    }


def build_mosaics(
    dataset_path: str | Path,
    out_dir: str | Path,
    split: str = "val",
    rows: int = 4,
    cols: int = 5,
    count: int = 20,
    queries_per_mosaic: int = 3,
    seed: int = 0,
    cell_size: int | None = None,
    image_format: str = "png",
    layout: str = "auto",
    progress: bool = True,
) -> list[Mosaic]:
    """Write ``count`` mosaics of ``split`` of the dataset at ``dataset_path`` with their SeLo annotations.

    See the module docstring for the sampling, the choices and the files written. Deterministic:
    the same arguments give byte-identical files.

    Raises:
        ConfigError: an argument is out of range.
        DatasetError: the dataset cannot be read, has no scene labels, or the split has fewer
            scene classes than ``rows * cols``.
        SplitNotFoundError: the dataset has no such split.
    """
    _check_args(rows, cols, count, queries_per_mosaic, cell_size, image_format)
    dataset = load_dataset(dataset_path, layout=layout)
    classes = class_images(dataset, split, rows * cols)
    side = cell_size or _default_side(dataset, dataset.split_indices(split)[0])
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    mosaics: list[Mosaic] = []
    for m in progress_bar(range(count), desc="mosaics", unit="mosaic", enabled=progress):
        mosaic, pixels = make_mosaic(dataset, classes, m, rows, cols, queries_per_mosaic, side, seed,
                                     IMAGE_FORMATS[image_format])
        _save(pixels, out / "images" / mosaic.image, image_format)
        mosaics.append(mosaic)
    write_annotations(out / "anno.json", [LocalizationSample(caption, m.image, [m.cells[k].polygon])
                                          for m in mosaics for k, caption in m.queries])
    write_json(out / "mosaics.json", {
        "format": "rsitr-mosaics-v1", "dataset": dataset.name, "split": split, "rows": rows, "cols": cols,
        "cell_size": side, "seed": seed, "image_format": image_format, "mosaics": [_record(m) for m in mosaics],
    })
    return mosaics
