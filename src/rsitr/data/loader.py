"""One entry point for every dataset layout: :func:`load_dataset` detects the layout of a path.

Detection rules, tried in this order (the first that matches wins):

1. a ``.json`` file with an ``"images"`` key, or a folder holding one ``dataset_*.json``
   -> Karpathy (:func:`rsitr.data.karpathy.read_karpathy`);
2. a folder, or its ``precomp/`` subfolder, holding ``*_caps.txt`` (or a ``*_caps.txt`` file)
   -> AMFMN precomp (:func:`rsitr.data.precomp.read_precomp`);
3. a folder, or its ``json/`` subfolder, holding ``{name}_{train,val,test}.json`` lists (or one
   such file) -> PIR/HarMA (:func:`rsitr.data.pir.read_pir`).

A dataset root such as ``rsitmd/`` holding both ``precomp/`` and ``json/`` is therefore read as
precomp; pass ``layout="pir"`` for the other.
"""

from __future__ import annotations

from pathlib import Path

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.karpathy import read_karpathy
from rsitr.data.pir import read_pir
from rsitr.data.precomp import read_precomp
from rsitr.errors import ConfigError, DatasetError, ImageReadError, UnknownLayoutError
from rsitr.io import read_json
from rsitr.progress import get_logger
from rsitr.text import tokenize

logger = get_logger(__name__)

#: Layout names accepted by :func:`load_dataset`.
LAYOUTS = ("auto", "karpathy", "precomp", "pir")

_EXPECTED = (
    "expected a Karpathy dataset_*.json, a precomp folder with {split}_caps.txt + {split}_filename.txt "
    "(here or in precomp/), or PIR/HarMA {name}_{train,val,test}.json (here or in json/)"
)


def _karpathy_json(folder: Path) -> Path | None:
    """The single ``dataset_*.json`` in ``folder``, ``None`` if there is none.

    Raises:
        UnknownLayoutError: there are several, so the dataset is ambiguous.
    """
    candidates = sorted(folder.glob("dataset_*.json"))
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise UnknownLayoutError(folder, f"several Karpathy json files ({names}); pass one of them")
    return candidates[0] if candidates else None


def _precomp_folder(folder: Path) -> Path | None:
    """``folder`` or ``folder/precomp`` if it holds ``*_caps.txt`` files."""
    for candidate in (folder, folder / "precomp"):
        if candidate.is_dir() and any(candidate.glob("*_caps*.txt")):
            return candidate
    return None


def _has_pir(folder: Path) -> bool:
    """Whether ``folder`` or ``folder/json`` holds ``{name}_{split}.json`` files."""
    for candidate in (folder, folder / "json"):
        if any(candidate.glob("*_train.json")) or any(candidate.glob("*_val.json")) or any(candidate.glob("*_test.json")):
            return True
    return False


def _detect_file(path: Path) -> str:
    """Layout of a single file."""
    if path.suffix.lower() == ".json":
        data = read_json(path)
        if isinstance(data, dict) and "images" in data:
            return "karpathy"
        if isinstance(data, list) and path.stem.rsplit("_", 1)[-1] in ("train", "val", "test"):
            return "pir"
    elif path.name.endswith(".txt") and ("_caps" in path.name or "_filename" in path.name):
        return "precomp"
    raise UnknownLayoutError(path, f"no known dataset layout ({_EXPECTED})")


def detect_layout(path: str | Path) -> str:
    """Name of the layout of ``path``: ``"karpathy"``, ``"precomp"`` or ``"pir"``.

    Raises:
        DatasetError: ``path`` does not exist.
        UnknownLayoutError: nothing at ``path`` matches a known layout.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(path, "no such file or folder")
    if path.is_file():
        return _detect_file(path)
    if _karpathy_json(path) is not None:
        return "karpathy"
    if _precomp_folder(path) is not None:
        return "precomp"
    if _has_pir(path):
        return "pir"
    raise UnknownLayoutError(path, f"no known dataset layout ({_EXPECTED})")


def load_dataset(
    path: str | Path,
    layout: str = "auto",
    image_dir: str | Path | None = None,
    name: str | None = None,
) -> RetrievalDataset:
    """Read the dataset at ``path`` in the given (or detected) layout.

    Args:
        path: a dataset file or folder (see the module docstring for what each layout accepts).
        layout: one of ``LAYOUTS``; ``"auto"`` detects it.
        image_dir: image folder, overriding each reader's default.
        name: dataset name, overriding each reader's default.

    Raises:
        ConfigError: ``layout`` is not one of ``LAYOUTS``.
        DatasetError: the path is missing or its files are inconsistent.
        UnknownLayoutError: ``layout="auto"`` and no layout matches, or the named layout's files
            are not at ``path``.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    path = Path(path)
    if not path.exists():
        raise DatasetError(path, "no such file or folder")
    if layout == "auto":
        layout = detect_layout(path)
    dataset = _read(path, layout, image_dir, name)
    warn_wordless_captions(dataset, path)
    return dataset


def warn_wordless_captions(dataset: RetrievalDataset, source: Path) -> int:
    """Log one line when captions have no word at all (empty, or only punctuation); returns how many.

    They stay in the dataset, as every reference split counts them, but a model sees them as a
    single ``<unk>``: worth knowing before training on them.
    """
    wordless = [c for c, text in enumerate(dataset.captions) if not tokenize(text)]
    if wordless:
        first = wordless[0]
        logger.warning("%s: %d caption(s) have no word (empty or only punctuation), e.g. caption %d of image %s: %r; "
                       "a model reads each as one <unk>", source, len(wordless), first,
                       dataset.image_files[int(dataset.caption_image[first])], dataset.captions[first])
    return len(wordless)


def _read(path: Path, layout: str, image_dir: str | Path | None, name: str | None) -> RetrievalDataset:
    if layout == "karpathy":
        json_path = path if path.is_file() else _karpathy_json(path)
        if json_path is None:
            raise UnknownLayoutError(path, "no Karpathy dataset_*.json here")
        return read_karpathy(json_path, image_dir=image_dir, name=name)
    if layout == "precomp":
        folder = path.parent if path.is_file() else _precomp_folder(path)
        if folder is None:
            raise UnknownLayoutError(path, "no precomp {split}_caps.txt files here or in precomp/")
        return read_precomp(folder, image_dir=image_dir, name=name)
    if path.is_dir() and not _has_pir(path):
        raise UnknownLayoutError(path, "no PIR/HarMA {name}_{train,val,test}.json files here or in json/")
    return read_pir(path, image_dir=image_dir, name=name)


def check_images(dataset: RetrievalDataset) -> None:
    """Check that every image file of ``dataset`` exists (readers do not, to allow caption-only use).

    Raises:
        ImageReadError: naming the first missing image file.
    """
    for index in range(dataset.num_images):
        path = dataset.image_path(index)
        if not path.is_file():
            raise ImageReadError(path, f"image file not found (image {index} of dataset {dataset.name!r})")
