"""PIR/HarMA json layout: ``{name}_train.json``, ``{name}_val.json``, ``{name}_test.json``.

The PIR and HarMA code bases (ALBEF-style retrieval) describe RSITMD and RSICD with one json list
per split:

* train: one entry per *caption*:
  ``{"caption": str, "image": "train/bridge_942.tif", "image_id": int, "label_name": "bridge", "label": int}``;
* val/test: one entry per *image*: ``{"image": "test/parking_229.tif", "caption": [str, ...]}``,
  with ``label_name`` in some releases (RSITMD val) and not others (test).

Both entry shapes are accepted in every split (detected per entry by whether ``caption`` is a list)
and entries naming the same image are merged. The ``image`` paths carry a split folder
(``train/``); it is kept only when the image folder really has such a subfolder, so that a flat
image folder (the AMFMN layout) resolves the same names as the precomp reader.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rsitr.data.dataset import SPLITS, RetrievalDataset
from rsitr.data.scenes import find_class_lists, infer_scene_labels
from rsitr.errors import DatasetError
from rsitr.io import read_json

_FILE_RE = re.compile(r"^(?P<name>.+)_(?P<split>train|val|test)\.json$")


def find_pir_files(folder: Path, name: str | None = None) -> dict[str, Path]:
    """The ``{name}_{split}.json`` files in ``folder`` (or its ``json/`` subfolder), by split.

    Raises:
        DatasetError: none found, or files of several datasets and no ``name`` to choose one.
    """
    for directory in (folder, folder / "json"):
        if not directory.is_dir():
            continue
        by_name: dict[str, dict[str, Path]] = {}
        for path in sorted(directory.glob("*.json")):
            match = _FILE_RE.match(path.name)
            if match:
                by_name.setdefault(match["name"], {})[match["split"]] = path
        if name is not None and name in by_name:
            return by_name[name]
        if len(by_name) == 1:
            return next(iter(by_name.values()))
        if len(by_name) > 1:
            raise DatasetError(
                directory, f"json files of several datasets ({', '.join(sorted(by_name))}); pass name= to pick one"
            )
    raise DatasetError(folder, "no PIR/HarMA json files (expected {name}_{train,val,test}.json here or in json/)")


def _files_by_split(paths: Sequence[Path]) -> tuple[dict[str, Path], str]:
    """Map explicit file paths to their split via the ``{name}_{split}.json`` naming."""
    files: dict[str, Path] = {}
    names = []
    for path in paths:
        match = _FILE_RE.match(path.name)
        if not match:
            raise DatasetError(path, "not a PIR/HarMA split file (expected {name}_{train,val,test}.json)")
        if match["split"] in files:
            raise DatasetError(path, f"second {match['split']} file (also {files[match['split']].name})")
        files[match["split"]] = path
        names.append(match["name"])
    return files, names[0]


def _entry_captions(entry: Any, index: int, path: Path) -> tuple[str, list[str], str | None]:
    """``(image, captions, label_name)`` of one json entry.

    Raises:
        DatasetError: the entry has no ``image`` or an empty caption.
    """
    where = f"entry {index}"
    if not isinstance(entry, dict) or not entry.get("image"):
        raise DatasetError(path, f"{where} has no image")
    image = str(entry["image"])
    raw = entry.get("caption")
    captions: list[Any] = raw if isinstance(raw, list) else [raw]
    for c, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetError(path, f"{where} ({image}) has an empty caption" + (f" at {c}" if len(captions) > 1 else ""))
    label = entry.get("label_name")
    return image, [c.strip() for c in captions], label if isinstance(label, str) and label else None


def _strip_split_folder(image: str, image_dir: Path) -> str:
    """Drop a leading ``train/``/``val/``/``test/`` unless ``image_dir`` has that subfolder."""
    parts = PurePosixPath(image.replace("\\", "/")).parts
    if len(parts) > 1 and parts[0] in SPLITS and not (image_dir / parts[0]).is_dir():
        return str(PurePosixPath(*parts[1:]))
    return image


def default_image_dir(json_dir: Path) -> Path:
    """``images/`` beside the json folder, else inside it, else the dataset root."""
    for candidate in (json_dir.parent / "images", json_dir / "images"):
        if candidate.is_dir():
            return candidate
    return json_dir.parent if json_dir.name == "json" else json_dir


def read_pir(
    folder_or_files: str | Path | Sequence[str | Path],
    image_dir: str | Path | None = None,
    name: str | None = None,
) -> RetrievalDataset:
    """Read PIR/HarMA-style split json files.

    Args:
        folder_or_files: a folder holding ``{name}_{split}.json`` (directly or in ``json/``), one
            such file, or a list of them.
        image_dir: image folder; default ``images/`` beside the json folder or inside it, else the
            dataset root.
        name: dataset name (also picks the files when a folder holds several datasets); default the
            ``{name}`` part of the file names.

    Returns:
        The dataset, splits in train/val/test order, images in order of first appearance. Scene
        labels come from ``label_name`` where given, else the filename prefix or ``classes/`` lists.

    Raises:
        DatasetError: no split files, invalid json, a file that is not a list, an entry without an
            image or with an empty caption.
    """
    if isinstance(folder_or_files, (str, Path)) and Path(folder_or_files).is_dir():
        files = find_pir_files(Path(folder_or_files), name)
        first = _FILE_RE.match(next(iter(files.values())).name)
        assert first is not None  # find_pir_files keeps only names that match _FILE_RE
        file_name = first["name"]
    else:
        paths = [Path(folder_or_files)] if isinstance(folder_or_files, (str, Path)) else [Path(p) for p in folder_or_files]
        if not paths:
            raise DatasetError(".", "no PIR/HarMA json files given")
        files, file_name = _files_by_split(paths)
    name = name or file_name
    json_dir = next(iter(files.values())).parent
    image_dir = Path(image_dir) if image_dir is not None else default_image_dir(json_dir)

    image_files: list[str] = []
    image_splits: list[str] = []
    explicit_labels: list[str | None] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for split in SPLITS:
        if split not in files:
            continue
        path = files[split]
        entries = read_json(path)
        if not isinstance(entries, list):
            raise DatasetError(path, "expected a json list of entries")
        grouped: dict[str, list[str]] = {}
        labels: dict[str, str | None] = {}
        for index, entry in enumerate(entries):
            image, entry_caps, label = _entry_captions(entry, index, path)
            grouped.setdefault(image, []).extend(entry_caps)
            if labels.get(image) is None:
                labels[image] = label
        for image, image_caps in grouped.items():
            image_id = len(image_files)
            image_files.append(_strip_split_folder(image, image_dir))
            image_splits.append(split)
            explicit_labels.append(labels[image])
            captions.extend(image_caps)
            caption_image.extend([image_id] * len(image_caps))

    class_lists = find_class_lists([json_dir.parent / "classes", json_dir / "classes"])
    return RetrievalDataset(
        name=name,
        image_dir=image_dir,
        image_files=image_files,
        image_splits=image_splits,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        scene_labels=infer_scene_labels(image_files, dataset_name=name, class_lists=class_lists, explicit=explicit_labels),
        source=json_dir,
    )
