"""AMFMN/GaLR "precomp" text layout: ``{split}_caps.txt`` + ``{split}_filename.txt``.

The AMFMN release of RSITMD (and the RSICD, Sydney and NWPU files prepared the same way) stores one
caption per line in ``{split}_caps.txt`` and image filenames in ``{split}_filename.txt``. The
relation between the two files differs between splits and releases, so it is detected per split:

* **blocks** — the filename file lists each image once and the caption file holds ``k`` lines per
  image in the same order (RSITMD/RSICD train, NWPU test; ``k = n_caps / n_files``, usually 5);
* **per caption** — the filename file repeats the image name once per caption (RSITMD/RSICD test);
  equal names are grouped into one image in order of first appearance.

``{split}_{caps,filename}_verify.txt`` hold AMFMN's fixed 80/20 re-split of train into train and
val (``verify=True`` reads those plus the regular test split).

Empty caption lines are an error, with one exception found in the RSITMD release: an image whose
``k`` caption lines are *all* empty (4 train images) has no annotation; it is dropped with a
warning rather than kept as an image no caption can retrieve.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rsitr.data.dataset import SPLITS, RetrievalDataset
from rsitr.data.scenes import find_class_lists, infer_scene_labels
from rsitr.errors import DatasetError

logger = logging.getLogger(__name__)


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without line endings (CRLF and a BOM are accepted).

    Splits on ``\\n`` only (not on the Unicode separators ``str.splitlines`` honours), so the line
    count matches ``wc -l`` plus a final unterminated line.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise DatasetError(path, "file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot read file ({exc.__class__.__name__})") from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _split_files(folder: Path, verify: bool) -> list[tuple[str, Path, Path]]:
    """``(split, caps_file, filename_file)`` of each split present, in canonical order."""
    suffix_of = {s: "_verify" if verify and s != "test" else "" for s in SPLITS}
    found = []
    for split in SPLITS:
        suffix = suffix_of[split]
        caps = folder / f"{split}_caps{suffix}.txt"
        names = folder / f"{split}_filename{suffix}.txt"
        if caps.is_file() != names.is_file():
            present, missing = (caps, names) if caps.is_file() else (names, caps)
            raise DatasetError(missing, f"file not found (needed with {present.name})")
        if caps.is_file():
            found.append((split, caps, names))
    return found


def _group_captions(
    caps_file: Path, names_file: Path, captions: list[str], names: list[str]
) -> list[tuple[str, list[tuple[int, str]]]]:
    """Pair images with their ``(line number, caption)`` lines, detecting the layout.

    Raises:
        DatasetError: the counts fit neither layout, or a name is empty or listed twice in the
            blocks layout.
    """
    for i, name in enumerate(names):
        if not name.strip():
            raise DatasetError(names_file, f"line {i + 1} is empty")
    names = [n.strip() for n in names]
    n_caps, n_files = len(captions), len(names)
    numbered = list(enumerate(captions, start=1))
    if n_files and n_caps == n_files:
        groups: dict[str, list[tuple[int, str]]] = {}
        for name, line in zip(names, numbered):
            groups.setdefault(name, []).append(line)
        return list(groups.items())
    if n_files == 0 or n_caps % n_files:
        raise DatasetError(
            caps_file,
            f"{n_caps} caption lines do not match the {n_files} names in {names_file.name} "
            "(expected a whole number of captions per name, or one name per caption)",
        )
    k = n_caps // n_files
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DatasetError(
                names_file, f"{name} is listed on lines {seen[name]} and {i + 1} but each image should appear once"
            )
        seen[name] = i + 1
    return [(name, numbered[i * k : (i + 1) * k]) for i, name in enumerate(names)]


def _read_split(caps_file: Path, names_file: Path) -> tuple[list[str], list[list[str]]]:
    """Image names and their captions for one split; see the module docstring for the rules."""
    groups = _group_captions(caps_file, names_file, read_lines(caps_file), read_lines(names_file))
    image_names: list[str] = []
    image_captions: list[list[str]] = []
    dropped: list[str] = []
    for name, lines in groups:
        texts = [text.strip() for _, text in lines]
        if not any(texts):
            dropped.append(name)
            continue
        for (line_no, _), text in zip(lines, texts):
            if not text:
                raise DatasetError(caps_file, f"line {line_no} is an empty caption (image {name})")
        image_names.append(name)
        image_captions.append(texts)
    if dropped:
        logger.warning(
            "%s: dropped %d image(s) whose captions are all empty lines: %s",
            caps_file,
            len(dropped),
            ", ".join(dropped),
        )
    return image_names, image_captions


def default_image_dir(folder: Path) -> Path:
    """``images/`` beside the precomp folder, else inside it, else the dataset root."""
    for candidate in (folder.parent / "images", folder / "images"):
        if candidate.is_dir():
            return candidate
    return folder.parent if folder.name == "precomp" else folder


def _dataset_name(folder: Path) -> str:
    """The dataset root's name: ``rsitmd`` for ``rsitmd/precomp``."""
    root = folder.parent if folder.name == "precomp" else folder
    return root.resolve().name or "precomp"


def read_precomp(
    folder: str | Path,
    image_dir: str | Path | None = None,
    name: str | None = None,
    verify: bool = False,
) -> RetrievalDataset:
    """Read an AMFMN-style precomp folder.

    Args:
        folder: the folder holding ``{split}_caps.txt`` / ``{split}_filename.txt``.
        image_dir: image folder; default ``images/`` next to ``folder`` (``<root>/images`` for
            ``<root>/precomp``) or inside it, else the dataset root.
        name: dataset name; default the dataset root folder's name.
        verify: read AMFMN's ``*_verify.txt`` re-split (train_verify -> train, val_verify -> val)
            plus the regular test split instead of the regular splits.

    Returns:
        The dataset, splits in train/val/test order, images in file order. Scene labels are
        attached when every image has one (filename prefix, or ``classes/`` lists beside the folder).

    Raises:
        DatasetError: no split files, a caption or filename file without its partner, counts that
            fit no layout, or an empty caption line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(folder, "folder not found")
    splits = _split_files(folder, verify)
    if verify and not any(split != "test" for split, _, _ in splits):
        raise DatasetError(folder, "no re-split files (expected {train,val}_{caps,filename}_verify.txt)")
    if not splits:
        raise DatasetError(folder, "no precomp split files (expected {train,val,test}_{caps,filename}.txt)")
    name = name or _dataset_name(folder)

    image_files: list[str] = []
    image_splits: list[str] = []
    captions: list[str] = []
    caption_image: list[int] = []
    for split, caps_file, names_file in splits:
        names, caps_per_image = _read_split(caps_file, names_file)
        for image_name, image_caps in zip(names, caps_per_image):
            image_id = len(image_files)
            image_files.append(image_name)
            image_splits.append(split)
            captions.extend(image_caps)
            caption_image.extend([image_id] * len(image_caps))

    class_lists = find_class_lists([folder.parent / "classes", folder / "classes"])
    return RetrievalDataset(
        name=name,
        image_dir=Path(image_dir) if image_dir is not None else default_image_dir(folder),
        image_files=image_files,
        image_splits=image_splits,
        captions=captions,
        caption_image=np.asarray(caption_image, dtype=np.int64),
        scene_labels=infer_scene_labels(image_files, dataset_name=name, class_lists=class_lists),
        source=folder,
    )
