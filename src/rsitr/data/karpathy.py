"""Karpathy-style ``dataset_*.json``: the layout UCM-Captions, Sydney-Captions and RSICD ship in.

The file (introduced by Karpathy & Fei-Fei for Flickr/COCO and reused by the remote-sensing caption
releases) is ``{"dataset": name, "images": [image, ...]}`` where each image is::

    {"filename": "1.tif", "split": "train" | "val" | "test" | "restval",
     "sentences": [{"raw": "There is a piece of farmland .", "tokens": [...]}, ...],
     optional "filepath", "imgid", "sentids", "keywords", "label"/"label_name"}

``restval`` (COCO's "rest of val") is training data. Some releases attach ``keywords`` to the
image and some to each sentence; both are stored per caption.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.scenes import find_class_lists, infer_scene_labels
from rsitr.errors import DatasetError
from rsitr.io import read_json, write_json

#: Karpathy split names mapped to ours.
_SPLIT_MAP = {"train": "train", "restval": "train", "val": "val", "test": "test"}

#: Image folder names looked for next to the json, in order.
IMAGE_DIR_NAMES = ("imgs", "images")

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def default_image_dir(json_path: Path) -> Path:
    """The first of ``imgs/``, ``images/`` beside ``json_path`` that exists, else its folder."""
    for name in IMAGE_DIR_NAMES:
        candidate = json_path.parent / name
        if candidate.is_dir():
            return candidate
    return json_path.parent


def _keyword_list(value: Any) -> list[str]:
    """Normalise a keyword field (list of strings, or one comma/space separated string)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [k for k in re.split(r"[,\s]+", value) if k]
    return [str(k) for k in value]


def _caption_text(sentence: Any, where: str, path: Path) -> str:
    """Raw text of one sentence entry (a dict with ``raw``/``tokens``, or a bare string)."""
    raw: Any
    if isinstance(sentence, str):
        raw = sentence
    elif isinstance(sentence, dict):
        raw = sentence.get("raw")
        if raw is None and sentence.get("tokens"):
            raw = " ".join(str(t) for t in sentence["tokens"])
    else:
        raw = None
    if raw is None or not str(raw).strip():
        raise DatasetError(path, f"{where} has an empty caption")
    return str(raw).strip()


def _image_label(entry: dict[str, Any]) -> str | None:
    """An explicit scene label of an image entry, if it carries a textual one."""
    for key in ("label_name", "label", "class", "scene"):
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _dataset_name(data: dict[str, Any], json_path: Path) -> str:
    """Name from the json's ``dataset`` field, else from ``dataset_<name>.json``."""
    if isinstance(data.get("dataset"), str) and data["dataset"]:
        return data["dataset"]
    stem = json_path.stem
    return stem[len("dataset_") :] if stem.startswith("dataset_") and len(stem) > 8 else stem


def read_karpathy(
    json_path: str | Path, image_dir: str | Path | None = None, name: str | None = None
) -> RetrievalDataset:
    """Read a Karpathy-style ``dataset_*.json``.

    Args:
        json_path: the json file.
        image_dir: folder the filenames are relative to; default: ``imgs/`` or ``images/`` beside
            the json if one exists, else the json's folder.
        name: dataset name; default: the json's ``dataset`` field or the ``*`` of ``dataset_*.json``.

    Returns:
        The dataset, images in file order. Scene labels are attached when every image has one
        (explicit ``label_name``/``label`` field, filename prefix, ``classes/`` lists, or the
        UCM-Captions numbering); keywords when any image or sentence carries them.

    Raises:
        DatasetError: the file is missing, not JSON, has no ``images`` list, or an image entry has
            no filename, an unknown split or an empty caption.
    """
    json_path = Path(json_path)
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(json_path, 'not a Karpathy-style dataset json (no "images" list)')
    name = name or _dataset_name(data, json_path)

    image_files: list[str] = []
    image_splits: list[str] = []
    explicit_labels: list[str | None] = []
    captions: list[str] = []
    caption_image: list[int] = []
    keywords: list[list[str]] = []
    any_keywords = False
    for index, entry in enumerate(data["images"]):
        where = f"images[{index}]"
        if not isinstance(entry, dict) or not entry.get("filename"):
            raise DatasetError(json_path, f"{where} has no filename")
        split = _SPLIT_MAP.get(str(entry.get("split", "")).lower())
        if split is None:
            raise DatasetError(
                json_path, f"{where} ({entry['filename']}) has split {entry.get('split')!r}, expected one of train, restval, val, test"
            )
        filename = str(entry["filename"])
        if entry.get("filepath"):
            filename = str(PurePosixPath(str(entry["filepath"])) / filename)
        image_id = len(image_files)
        image_files.append(filename)
        image_splits.append(split)
        explicit_labels.append(_image_label(entry))
        image_keywords = entry.get("keywords")
        any_keywords |= image_keywords is not None
        for s, sentence in enumerate(entry.get("sentences") or []):
            captions.append(_caption_text(sentence, f"{where}.sentences[{s}] of {filename}", json_path))
            caption_image.append(image_id)
            sentence_keywords = sentence.get("keywords") if isinstance(sentence, dict) else None
            any_keywords |= sentence_keywords is not None
            keywords.append(_keyword_list(sentence_keywords if sentence_keywords is not None else image_keywords))

    scene_labels = infer_scene_labels(
        image_files,
        dataset_name=name,
        class_lists=find_class_lists([json_path.parent / "classes"]),
        explicit=explicit_labels,
    )
    return RetrievalDataset(
        name=name,
        image_dir=Path(image_dir) if image_dir is not None else default_image_dir(json_path),
        image_files=image_files,
        image_splits=image_splits,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        scene_labels=scene_labels,
        keywords=keywords if any_keywords else None,
        source=json_path,
    )


def simple_tokens(text: str) -> list[str]:
    """Lower-case word tokens of ``text`` without punctuation, as in the Karpathy ``tokens`` field."""
    return _TOKEN_RE.findall(text.lower())


def write_karpathy(dataset: RetrievalDataset, json_path: str | Path) -> None:
    """Write ``dataset`` as a Karpathy-style json, atomically.

    Filenames are written as stored, i.e. relative to ``dataset.image_dir``; put the json beside an
    ``imgs/`` or ``images/`` folder (or pass ``image_dir`` when reading) so they resolve again.
    Scene labels go to each image's ``label_name``, keywords to each sentence's ``keywords``.
    """
    captions_by_image: list[list[int]] = [[] for _ in range(dataset.num_images)]
    for caption_id, image_id in enumerate(dataset.caption_image.tolist()):
        captions_by_image[image_id].append(caption_id)
    images = []
    for image_id, filename in enumerate(dataset.image_files):
        sentences = []
        for caption_id in captions_by_image[image_id]:
            raw = dataset.captions[caption_id]
            sentence: dict[str, Any] = {
                "raw": raw,
                "tokens": simple_tokens(raw),
                "imgid": image_id,
                "sentid": caption_id,
            }
            if dataset.keywords is not None:
                sentence["keywords"] = list(dataset.keywords[caption_id])
            sentences.append(sentence)
        entry: dict[str, Any] = {
            "filename": filename.replace("\\", "/"),
            "imgid": image_id,
            "split": dataset.image_splits[image_id],
            "sentences": sentences,
            "sentids": captions_by_image[image_id],
        }
        if dataset.scene_labels is not None:
            entry["label_name"] = dataset.scene_labels[image_id]
        images.append(entry)
    write_json(json_path, {"dataset": dataset.name, "images": images})
