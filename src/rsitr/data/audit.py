"""Data hygiene for image–text retrieval datasets: repeated captions, duplicated images, leaks.

A retrieval benchmark is only as clean as its splits. :func:`audit_datasets` looks at one dataset
or several together and finds

1. **captions repeated within a split** and **captions shared between splits** of a dataset;
2. **images duplicated or near-duplicated** across splits and across datasets (and, for
   information, within a split), by perceptual hash;
3. **test and val captions that appear in another dataset's train split** (a model trained on
   RSICD has seen some RSITMD test captions word for word).

Captions are compared after :func:`normalise_caption` (Unicode NFKC, case-folded, punctuation
replaced by spaces, whitespace collapsed), so ``"A plane ."`` and ``"a plane"`` are the same text.

Images are compared by pHash (:func:`imagehash.phash`, 64 bits: the signs of the 8 × 8
lowest-frequency DCT coefficients of a 32 × 32 grayscale copy relative to their median). Two
images are near-duplicates when the Hamming distance of their hashes is at most ``threshold``
(``DEFAULT_THRESHOLD = 6``; ``rsitr data audit --threshold``). The median splits the 64
coefficients in half, so a hash has 32 bits set and distances are even (barring ties). The
default was chosen on UCM-Captions (1890 images, 256 px; ``benchmarks/phash_threshold.py``): a
copy resized to 75 % and re-saved as JPEG at quality 75 is within distance 6 of its original for
1888 of the 1890 images (at 0 for 1556), a copy at 90 % and quality 75 for 1888, one at full size
and quality 90 for all 1890, one at 50 % and quality 50 for 1876; while among the 1,785,105 pairs of UCM images the closest pair
that is not the same picture is at distance 8 (beach scenes 375 and 376: the same coast on
different days) and the next three are at 10. So 6 catches re-encoded and rescaled copies and
stays clear of merely similar scenes. pHash does not find crops, rotations or flips: overlapping
tiles and augmented copies are not reported.

Which side is dropped. The only items this module proposes to drop are **training** items, never
val or test ones, so the benchmark numbers stay comparable with published ones:

* a train caption whose text also occurs in val or test of the same dataset, or in val or test of
  another audited dataset: that train caption (every train caption of that text);
* a train image that is a (near-)duplicate of a val or test image of the same or another audited
  dataset: that train image with all its captions.

Repeats within a split, train–train duplicates across datasets and val–test overlaps are reported
but proposed for nothing: they are not leaks a training run can avoid by dropping its own data.
Each proposed item records the ``"dataset/split"`` items it collides with; a run that is evaluated
on one split only keeps just the entries that matter to it with :meth:`Exclusions.restricted_to`.

Exclusions name items by dataset name + image file name (as in ``RetrievalDataset.image_files``)
+ normalised caption text, never by index, so they survive re-reading a dataset in another layout
or order. :func:`read_exclusions` reads them from an ``audit.json`` (or a smaller file holding
only its ``"exclusions"`` part) and :func:`apply_exclusions` removes them from a dataset.

The ``audit.json`` written by :func:`write_audit` (``format: "rsitr-audit-v1"``)::

    {"format": "rsitr-audit-v1",
     "settings": {"hash": "phash", "hash_bits": 64, "threshold": 6, "hash_images": true,
                  "caption_normalisation": "..."},
     "datasets": [{"name", "source", "layout", "image_dir",
                   "splits": {split: {"images": n, "captions": n}},
                   "images": {"total", "hashed", "missing", "unreadable": [file, ...], "note"}}],
     "captions": {
        "within_split": [{"dataset", "split", "caption", "occurrences", "images": [file, ...]}],
        "cross_split": [{"dataset", "caption", "splits": {split: [file, ...]}}],
        "cross_dataset": [{"caption", "eval": {"dataset", "split", "images": [file, ...], "captions": n},
                           "train": {"dataset", "images": [file, ...], "captions": n}}]},
     "images": {"pairs": [{"kind": "within_split" | "cross_split" | "cross_dataset",
                           "distance": d, "identical_files": bool,
                           "a": {"dataset", "split", "image"}, "b": {"dataset", "split", "image"}}]},
     "summary": {...counts that audit.md tabulates...},
     "exclusions": {
        "images": [{"dataset", "image", "conflicts": ["dataset/split", ...]}],
        "captions": [{"dataset", "image", "caption", "conflicts": ["dataset/split", ...]}]}}

``caption`` fields hold normalised text.
"""

from __future__ import annotations

import hashlib
import io
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import to_rgb
from rsitr.errors import ConfigError, DatasetError
from rsitr.io import read_json, write_json, write_text
from rsitr.progress import get_logger, progress_bar

logger = get_logger(__name__)

#: Value of the ``format`` field of ``audit.json``.
FORMAT = "rsitr-audit-v1"
#: Largest pHash Hamming distance (of 64 bits) at which two images count as near-duplicates.
DEFAULT_THRESHOLD = 6
#: Bits of a pHash (``hash_size=8``).
HASH_BITS = 64
#: The split training reads; every other split is an evaluation split.
TRAIN = "train"
#: Examples per table in ``audit.md``.
EXAMPLES = 3

_NORMALISATION = "Unicode NFKC, case-folded, every character that is not a letter or digit replaced by a space, whitespace collapsed"
_NOT_ALNUM = re.compile(r"[\W_]+")
_PAIR_BLOCK = 1 << 22  # hash comparisons per block of the all-pairs search


def normalise_caption(text: str) -> str:
    """The form captions are compared in: NFKC, case-folded, punctuation and ``_`` as spaces, single spaces.

    >>> normalise_caption("  Two  planes, parked near the TERMINAL . ")
    'two planes parked near the terminal'
    """
    return " ".join(_NOT_ALNUM.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


# ----------------------------------------------------------------------------------------- captions


def _caption_index(dataset: RetrievalDataset) -> dict[str, dict[str, list[int]]]:
    """normalised text -> split -> caption ids (in dataset order); empty texts are left out."""
    index: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    splits = dataset.image_splits
    for caption_id, (text, image_id) in enumerate(zip(dataset.captions, dataset.caption_image.tolist())):
        norm = normalise_caption(text)
        if norm:
            index[norm][splits[image_id]].append(caption_id)
    return index


def _files_of(dataset: RetrievalDataset, caption_ids: Iterable[int]) -> list[str]:
    """Distinct image files of the given captions, in order of first appearance."""
    images = dict.fromkeys(int(dataset.caption_image[c]) for c in caption_ids)
    return [dataset.image_files[i] for i in images]


def _split_rank(split: str) -> tuple[int, str]:
    return {"train": 0, "val": 1, "test": 2}.get(split, 3), split


def _split_order(splits: Iterable[str]) -> list[str]:
    return sorted(splits, key=_split_rank)


# ------------------------------------------------------------------------------------------- images


@dataclass
class _Hashed:
    """The hashes of one dataset's readable images."""

    image_ids: list[int]
    hashes: list[int]
    digests: list[bytes]
    missing: list[str]
    unreadable: list[str]


def perceptual_hash(data: bytes) -> int:
    """64-bit pHash of an encoded image, as an integer."""
    import imagehash  # here, so that reading and applying exclusions needs neither it nor scipy

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)
    bits = np.asarray(imagehash.phash(rgb, hash_size=8).hash, dtype=bool).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _hash_images(datasets: Sequence[RetrievalDataset], progress: bool) -> list[_Hashed]:
    """pHash and SHA-256 of every image file present; missing and undecodable files are listed."""
    results: list[_Hashed] = []
    present: list[tuple[int, int]] = []
    for d, dataset in enumerate(datasets):
        missing = [f for i, f in enumerate(dataset.image_files) if not dataset.image_path(i).is_file()]
        results.append(_Hashed([], [], [], missing, []))
        missing_set = set(missing)
        present.extend((d, i) for i, f in enumerate(dataset.image_files) if f not in missing_set)
        if missing and len(missing) == dataset.num_images:
            logger.warning("%s: no image file found in %s (%d listed, e.g. %s); its images are not audited, its captions are",
                           dataset.name, dataset.image_dir, dataset.num_images, missing[0])
        elif missing:
            logger.warning("%s: %d of %d image files not found in %s (e.g. %s); hashing the %d present",
                           dataset.name, len(missing), dataset.num_images, dataset.image_dir, missing[0],
                           dataset.num_images - len(missing))
    for d, i in progress_bar(present, desc="hashing images", unit="img", enabled=progress):
        path = datasets[d].image_path(i)
        try:
            data = path.read_bytes()
            value = perceptual_hash(data)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            logger.warning("%s: cannot decode image (%s); left out of the image audit", path, exc.__class__.__name__)
            results[d].unreadable.append(datasets[d].image_files[i])
            continue
        results[d].image_ids.append(i)
        results[d].hashes.append(value)
        results[d].digests.append(hashlib.sha256(data).digest())
    return results


_BYTE_BITS = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (``np.bitwise_count`` where numpy has it, numpy < 2 by a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return _BYTE_BITS[values.view(np.uint8)].reshape(*values.shape, 8).sum(axis=-1, dtype=np.uint8)


def _close_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All index pairs ``i < j`` whose hashes differ in at most ``threshold`` bits, and their distances."""
    n = len(hashes)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    dists: list[np.ndarray] = []
    block = max(1, _PAIR_BLOCK // max(n, 1))
    for start in range(0, n, block):
        stop = min(n, start + block)
        distance = popcount(hashes[start:stop, None] ^ hashes[None, :])
        r, c = np.nonzero(distance <= threshold)
        keep = c > r + start
        rows.append(r[keep] + start)
        cols.append(c[keep])
        dists.append(distance[r[keep], c[keep]])
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists).astype(np.int64)


def _image_note(dataset: RetrievalDataset, hashed: _Hashed | None) -> str:
    if hashed is None:
        return "not hashed (captions only, as asked)"
    if len(hashed.missing) == dataset.num_images:
        return f"no image files found in {dataset.image_dir}: captions only"
    parts = []
    if hashed.missing:
        parts.append(f"{len(hashed.missing)} of {dataset.num_images} image files not found in {dataset.image_dir}")
    if hashed.unreadable:
        parts.append(f"{len(hashed.unreadable)} could not be decoded")
    return "; ".join(parts) if parts else "all images hashed"


# -------------------------------------------------------------------------------------------- audit


def audit_datasets(
    datasets: Sequence[RetrievalDataset],
    *,
    threshold: int = DEFAULT_THRESHOLD,
    hash_images: bool = True,
    layouts: Sequence[str | None] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit one or several datasets together; the result is the content of ``audit.json``.

    Args:
        datasets: the datasets, each with a distinct ``name`` (exclusions are keyed by it).
        threshold: largest pHash Hamming distance (0–64) at which two images are near-duplicates.
        hash_images: False audits captions only.
        layouts: the layout each dataset was read from, recorded in the report (optional).
        progress: a progress bar over the images being hashed.

    Returns:
        The report, a JSON-ready dict in the schema of the module docstring. Missing image files
        (a precomp folder usually comes without images) leave those images out of the image
        audit with one warning per dataset; an undecodable file gets one warning naming it. Both
        are counted in ``datasets[*].images``.

    Raises:
        ConfigError: two datasets share a name, none is given, or ``threshold`` is outside 0–64.
    """
    if not datasets:
        raise ConfigError("audit: give at least one dataset")
    if not 0 <= threshold <= HASH_BITS:
        raise ConfigError(f"audit: threshold must be between 0 and {HASH_BITS} bits (got {threshold})")
    names = [d.name for d in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"audit: several datasets are named {', '.join(map(repr, repeated))}; "
                          "exclusions are keyed by dataset name, so give each a distinct name")
    if layouts is not None and len(layouts) != len(datasets):
        raise ConfigError(f"audit: {len(layouts)} layouts for {len(datasets)} datasets")

    indexes = [_caption_index(d) for d in datasets]
    within, cross_split, cross_dataset = _caption_findings(datasets, indexes)
    hashed = _hash_images(datasets, progress) if hash_images else None
    pairs = _image_pairs(datasets, hashed, threshold) if hashed is not None else []
    exclusions = _exclusions(datasets, indexes, cross_split, cross_dataset, pairs)

    entries = []
    for d, dataset in enumerate(datasets):
        h = hashed[d] if hashed is not None else None
        entries.append({
            "name": dataset.name,
            "source": None if dataset.source is None else str(dataset.source),
            "layout": None if layouts is None else layouts[d],
            "image_dir": str(dataset.image_dir),
            "splits": {s: {"images": dataset.image_splits.count(s),
                           "captions": int(sum(dataset.image_splits[i] == s for i in dataset.caption_image.tolist()))}
                       for s in dataset.splits()},
            "images": {"total": dataset.num_images,
                       "hashed": 0 if h is None else len(h.hashes),
                       "missing": None if h is None else len(h.missing),
                       "unreadable": [] if h is None else sorted(h.unreadable),
                       "note": _image_note(dataset, h)},
        })
    report: dict[str, Any] = {
        "format": FORMAT,
        "settings": {"hash": "phash", "hash_bits": HASH_BITS, "threshold": threshold, "hash_images": hash_images,
                     "caption_normalisation": _NORMALISATION},
        "datasets": entries,
        "captions": {"within_split": within, "cross_split": cross_split, "cross_dataset": cross_dataset},
        "images": {"pairs": pairs},
        "exclusions": exclusions,
    }
    report["summary"] = _summary(datasets, indexes, report)
    return report


def _caption_findings(datasets: Sequence[RetrievalDataset], indexes: Sequence[dict[str, dict[str, list[int]]]]
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Within-split repeats, texts shared between splits, and eval texts found in another dataset's train."""
    order = {d.name: k for k, d in enumerate(datasets)}
    within: list[dict[str, Any]] = []
    cross_split: list[dict[str, Any]] = []
    for dataset, index in zip(datasets, indexes):
        for text, by_split in index.items():
            for split in _split_order(by_split):
                ids = by_split[split]
                if len(ids) > 1:
                    within.append({"dataset": dataset.name, "split": split, "caption": text,
                                   "occurrences": len(ids), "images": _files_of(dataset, ids)})
            if len(by_split) > 1:
                cross_split.append({"dataset": dataset.name, "caption": text,
                                    "splits": {s: _files_of(dataset, by_split[s]) for s in _split_order(by_split)}})
    within.sort(key=lambda e: (order[e["dataset"]], _split_rank(e["split"]), -e["occurrences"], e["caption"]))
    cross_split.sort(key=lambda e: (order[e["dataset"]], e["caption"]))

    cross_dataset: list[dict[str, Any]] = []
    for a, (eval_set, eval_index) in enumerate(zip(datasets, indexes)):
        for text, by_split in eval_index.items():
            for split in _split_order(s for s in by_split if s != TRAIN):
                for b, (train_set, train_index) in enumerate(zip(datasets, indexes)):
                    train_ids = train_index.get(text, {}).get(TRAIN) if b != a else None
                    if train_ids:
                        cross_dataset.append({
                            "caption": text,
                            "eval": {"dataset": eval_set.name, "split": split, "images": _files_of(eval_set, by_split[split]),
                                     "captions": len(by_split[split])},
                            "train": {"dataset": train_set.name, "images": _files_of(train_set, train_ids),
                                      "captions": len(train_ids)},
                        })
    cross_dataset.sort(key=lambda e: (order[e["eval"]["dataset"]], _split_rank(e["eval"]["split"]), order[e["train"]["dataset"]],
                                       e["caption"]))
    return within, cross_split, cross_dataset


def _image_pairs(datasets: Sequence[RetrievalDataset], hashed: Sequence[_Hashed], threshold: int) -> list[dict[str, Any]]:
    """Every pair of hashed images within ``threshold`` bits, classified by where its two sides are."""
    owner = [(d, i) for d, h in enumerate(hashed) for i in h.image_ids]
    values = np.array([v for h in hashed for v in h.hashes], dtype=np.uint64)
    digests = [g for h in hashed for g in h.digests]
    rows, cols, dists = _close_pairs(values, threshold)
    pairs = []
    for r, c, dist in zip(rows.tolist(), cols.tolist(), dists.tolist()):
        (da, ia), (db, ib) = owner[r], owner[c]
        sa, sb = datasets[da].image_splits[ia], datasets[db].image_splits[ib]
        kind = "cross_dataset" if da != db else ("within_split" if sa == sb else "cross_split")
        pairs.append({"kind": kind, "distance": int(dist), "identical_files": digests[r] == digests[c],
                      "a": {"dataset": datasets[da].name, "split": sa, "image": datasets[da].image_files[ia]},
                      "b": {"dataset": datasets[db].name, "split": sb, "image": datasets[db].image_files[ib]}})
    kinds = {"cross_split": 0, "cross_dataset": 1, "within_split": 2}
    pairs.sort(key=lambda p: (kinds[p["kind"]], p["distance"], p["a"]["dataset"], p["a"]["image"], p["b"]["dataset"], p["b"]["image"]))
    return pairs


def _exclusions(datasets: Sequence[RetrievalDataset], indexes: Sequence[dict[str, dict[str, list[int]]]],
                cross_split: list[dict[str, Any]], cross_dataset: list[dict[str, Any]],
                pairs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The training items to drop: always the train side of a train–val/test collision."""
    by_name = {d.name: (d, index) for d, index in zip(datasets, indexes)}
    caption_conflicts: dict[tuple[str, str, str], set[str]] = defaultdict(set)

    def add_captions(name: str, text: str, conflicts: list[str]) -> None:
        dataset, index = by_name[name]
        for caption_id in index[text].get(TRAIN, []):
            file = dataset.image_files[int(dataset.caption_image[caption_id])]
            caption_conflicts[(name, file, text)].update(conflicts)

    for entry in cross_split:
        if TRAIN in entry["splits"]:
            add_captions(entry["dataset"], entry["caption"], [f"{entry['dataset']}/{s}" for s in entry["splits"] if s != TRAIN])
    for entry in cross_dataset:
        add_captions(entry["train"]["dataset"], entry["caption"], [f"{entry['eval']['dataset']}/{entry['eval']['split']}"])

    image_conflicts: dict[tuple[str, str], set[str]] = defaultdict(set)
    for pair in pairs:
        for train_side, other in ((pair["a"], pair["b"]), (pair["b"], pair["a"])):
            if train_side["split"] == TRAIN and other["split"] != TRAIN:
                image_conflicts[(train_side["dataset"], train_side["image"])].add(f"{other['dataset']}/{other['split']}")
    order = {d.name: k for k, d in enumerate(datasets)}
    return {
        "images": [{"dataset": n, "image": f, "conflicts": sorted(c)}
                   for (n, f), c in sorted(image_conflicts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))],
        "captions": [{"dataset": n, "image": f, "caption": t, "conflicts": sorted(c)}
                     for (n, f, t), c in sorted(caption_conflicts.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2]))],
    }


def _summary(datasets: Sequence[RetrievalDataset], indexes: Sequence[dict[str, dict[str, list[int]]]],
             report: dict[str, Any]) -> dict[str, Any]:
    """The counts ``audit.md`` tabulates."""
    captions = report["captions"]
    within: dict[str, dict[str, dict[str, int]]] = {}
    for dataset, index, entry in zip(datasets, indexes, report["datasets"]):
        within[dataset.name] = {}
        for split in dataset.splits():
            distinct = sum(split in by_split for by_split in index.values())
            nonempty = sum(len(by_split.get(split, [])) for by_split in index.values())
            total = entry["splits"][split]["captions"]
            within[dataset.name][split] = {"captions": total, "distinct": distinct, "empty": total - nonempty,
                                           "repeated_texts": 0, "extra_copies": 0, "texts_on_several_images": 0}
    for e in captions["within_split"]:
        row = within[e["dataset"]][e["split"]]
        row["repeated_texts"] += 1
        row["extra_copies"] += e["occurrences"] - 1
        row["texts_on_several_images"] += len(e["images"]) > 1

    cross: dict[str, dict[str, int]] = {d.name: {} for d in datasets}
    for e in captions["cross_split"]:
        splits = list(e["splits"])
        for x in range(len(splits)):
            for y in range(x + 1, len(splits)):
                key = f"{splits[x]}-{splits[y]}"
                cross[e["dataset"]][key] = cross[e["dataset"]].get(key, 0) + 1
    in_train: dict[str, dict[str, dict[str, int]]] = {}
    for dataset, index, entry in zip(datasets, indexes, report["datasets"]):
        in_train[dataset.name] = {
            split: {"captions": entry["splits"][split]["captions"],
                    "in_train": sum(len(by_split.get(split, [])) for by_split in index.values() if TRAIN in by_split)}
            for split in dataset.splits() if split != TRAIN}

    leaks: dict[str, dict[str, int]] = {}
    eval_sizes = {(d["name"], s): v["captions"] for d in report["datasets"] for s, v in d["splits"].items()}
    for e in captions["cross_dataset"]:
        key = f"{e['eval']['dataset']}/{e['eval']['split']} in {e['train']['dataset']}/train"
        row = leaks.setdefault(key, {"texts": 0, "eval_captions": 0, "eval_split_captions": eval_sizes[(e["eval"]["dataset"], e["eval"]["split"])],
                                     "train_captions": 0})
        row["texts"] += 1
        row["eval_captions"] += e["eval"]["captions"]
        row["train_captions"] += e["train"]["captions"]

    image_pairs: dict[str, dict[str, int]] = {}
    for p in report["images"]["pairs"]:
        a, b = p["a"], p["b"]
        key = f"{a['dataset']}/{a['split']} – {b['dataset']}/{b['split']}"
        row = image_pairs.setdefault(key, {"pairs": 0, "identical_files": 0, "same_hash": 0, "near": 0})
        row["pairs"] += 1
        row["identical_files"] += p["identical_files"]
        row["same_hash"] += p["distance"] == 0
        row["near"] += p["distance"] > 0

    exclusions = _exclusions_of(report["exclusions"])
    dropped: dict[str, dict[str, int]] = {}
    for dataset in datasets:
        if TRAIN not in dataset.image_splits:
            continue
        own = [f"{dataset.name}/{s}" for s in dataset.splits() if s != TRAIN]
        _, every = _apply(dataset, exclusions, TRAIN, warn=False)
        _, mine = _apply(dataset, exclusions.restricted_to(own), TRAIN, warn=False)
        dropped[dataset.name] = {
            "train_images": dataset.image_splits.count(TRAIN),
            "train_captions": sum(dataset.image_splits[i] == TRAIN for i in dataset.caption_image.tolist()),
            "image_entries": sum(e["dataset"] == dataset.name for e in report["exclusions"]["images"]),
            "caption_entries": sum(e["dataset"] == dataset.name for e in report["exclusions"]["captions"]),
            "images_dropped": every["images_dropped"], "captions_dropped": every["captions_dropped"],
            "own_images_dropped": mine["images_dropped"], "own_captions_dropped": mine["captions_dropped"],
        }
    return {"within_split": within, "cross_split": cross, "eval_in_train": in_train, "cross_dataset": leaks,
            "image_pairs": image_pairs, "exclusions": dropped}


# ----------------------------------------------------------------------------------------- markdown


def _cell(text: Any, limit: int = 90) -> str:
    s = str(text)
    if len(s) > limit:
        s = s[: limit - 1] + "…"
    return s.replace("|", "\\|").replace("\n", " ")


def _share(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.1f} %)" if whole else str(part)


def _files(files: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" (+{len(files) - limit})" if len(files) > limit else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(report: Mapping[str, Any], examples: int = EXAMPLES) -> str:
    """``audit.md``: the report's counts as tables, with up to ``examples`` examples under each."""
    s = report["settings"]
    summary = report["summary"]
    caps = report["captions"]
    out = ["# Data audit", ""]
    out.append(f"Captions are compared after normalisation ({s['caption_normalisation']}). "
               + (f"Images are compared by pHash ({s['hash_bits']} bits); a pair is reported when the Hamming distance "
                  f"is at most {s['threshold']}." if s["hash_images"] else "Images were not hashed."))
    out.append("")

    out += ["## Datasets", ""]
    rows = []
    for d in report["datasets"]:
        splits = " / ".join(f"{k} {v['images']}" for k, v in d["splits"].items())
        ncaps = " / ".join(f"{k} {v['captions']}" for k, v in d["splits"].items())
        im = d["images"]
        rows.append([d["name"], d.get("layout") or "", splits, ncaps, im["hashed"],
                     "" if im["missing"] is None else im["missing"], len(im["unreadable"]), im["note"]])
    out += _table(["dataset", "layout", "images", "captions", "hashed", "missing", "undecodable", "note"], rows)
    unreadable = [(d["name"], f) for d in report["datasets"] for f in d["images"]["unreadable"]]
    if unreadable:
        out += ["", "Undecodable image files: " + ", ".join(f"{n}/{f}" for n, f in unreadable[:20])
                + (f" (+{len(unreadable) - 20})" if len(unreadable) > 20 else "")]
    out.append("")

    out += ["## Captions repeated within a split", ""]
    rows = [[name, split, r["captions"], r["distinct"], r["repeated_texts"], r["extra_copies"], r["texts_on_several_images"],
             r["empty"]] for name, by_split in summary["within_split"].items() for split, r in by_split.items()]
    out += _table(["dataset", "split", "captions", "distinct texts", "repeated texts", "extra copies",
                   "repeated texts on several images", "empty after normalising (left out)"], rows)
    top = [e for d in report["datasets"]
           for e in sorted((e for e in caps["within_split"] if e["dataset"] == d["name"]), key=lambda e: -e["occurrences"])[:examples]]
    if top:
        out += ["", "Most repeated:", ""]
        out += [f"- {e['dataset']}/{e['split']}: “{_cell(e['caption'])}” × {e['occurrences']} "
                f"on {len(e['images'])} image(s) ({_files(e['images'])})" for e in top]
    out.append("")

    out += ["## Captions shared between splits of a dataset", ""]
    pair_keys = sorted({k for r in summary["cross_split"].values() for k in r})
    rows = [[name, *[r.get(k, 0) for k in pair_keys],
             "; ".join(f"{s} {_share(v['in_train'], v['captions'])}" for s, v in summary["eval_in_train"][name].items()) or "no eval split"]
            for name, r in summary["cross_split"].items()]
    out += _table(["dataset", *[f"texts in {k.replace('-', ' and ')}" for k in pair_keys],
                   "val/test captions whose text is in train"], rows)
    shown = [e for d in report["datasets"] for e in [e for e in caps["cross_split"] if e["dataset"] == d["name"]][:examples]]
    if shown:
        out += ["", "Examples:", ""]
        out += ["- " + e["dataset"] + ": “" + _cell(e["caption"]) + "” in "
                + "; ".join(f"{k} ({_files(v, 2)})" for k, v in e["splits"].items()) for e in shown]
    out.append("")

    out += ["## Val and test captions in another dataset's train split", ""]
    if summary["cross_dataset"]:
        out += _table(["eval split in train split", "distinct texts", "eval captions with them", "train captions with them"],
                      [[k, v["texts"], _share(v["eval_captions"], v["eval_split_captions"]), v["train_captions"]]
                       for k, v in summary["cross_dataset"].items()])
        per_row: dict[str, int] = defaultdict(int)
        shown = []
        for e in caps["cross_dataset"]:  # up to `examples` per row of the table
            key = f"{e['eval']['dataset']}/{e['eval']['split']} in {e['train']['dataset']}/train"
            if per_row[key] < examples:
                per_row[key] += 1
                shown.append(e)
        out += ["", "Examples:", ""]
        out += [f"- “{_cell(e['caption'])}”: {e['eval']['dataset']}/{e['eval']['split']} ({_files(e['eval']['images'], 2)}) "
                f"and {e['train']['dataset']}/train ({_files(e['train']['images'], 2)})" for e in shown]
    else:
        out.append("None found." if len(report["datasets"]) > 1 else "Needs two or more datasets.")
    out.append("")

    out += ["## Duplicate and near-duplicate images", ""]
    if not s["hash_images"]:
        out.append("Images were not hashed.")
    elif summary["image_pairs"]:
        out += _table(["between", "pairs", "identical files", "distance 0", f"distance 1–{s['threshold']}"],
                      [[k, v["pairs"], v["identical_files"], v["same_hash"], v["near"]] for k, v in summary["image_pairs"].items()])
        seen_kinds: dict[str, int] = defaultdict(int)
        shown = []
        for p in report["images"]["pairs"]:
            if seen_kinds[p["kind"]] < examples:
                seen_kinds[p["kind"]] += 1
                shown.append(p)
        out += ["", "Examples:", ""]
        out += [f"- {p['kind'].replace('_', ' ')}: {p['a']['dataset']}/{p['a']['split']}/{p['a']['image']} and "
                f"{p['b']['dataset']}/{p['b']['split']}/{p['b']['image']}, distance {p['distance']}"
                + (", identical files" if p["identical_files"] else "") for p in shown]
    else:
        out.append("None found.")
    out.append("")

    out += ["## Training items to drop", "",
            "Always the training side of a collision with a val or test item (of the same or another dataset); "
            "val and test are never changed. `audit.json` lists them under `exclusions`; "
            "`rsitr.data.audit.read_exclusions` and `apply_exclusions` remove them from a dataset.", ""]
    out += ["`apply_exclusions` drops the listed train images and captions, and the train images the caption entries leave "
            "with no caption. Counts for all the entries, and for those that collide with the dataset's own val/test "
            "(`Exclusions.restricted_to`):", ""]
    out += _table(["dataset", "train images", "train captions", "image entries", "caption entries",
                   "dropped: images", "dropped: captions", "own val/test only: images", "own val/test only: captions"],
                  [[n, r["train_images"], r["train_captions"], r["image_entries"], r["caption_entries"],
                    _share(r["images_dropped"], r["train_images"]), _share(r["captions_dropped"], r["train_captions"]),
                    _share(r["own_images_dropped"], r["train_images"]), _share(r["own_captions_dropped"], r["train_captions"])]
                   for n, r in summary["exclusions"].items()])
    out.append("")
    return "\n".join(out)


def write_audit(report: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``out_dir/audit.json`` and ``out_dir/audit.md`` atomically; returns both paths."""
    out = Path(out_dir)
    json_path, md_path = out / "audit.json", out / "audit.md"
    write_json(json_path, dict(report))
    write_text(md_path, render_markdown(report))
    return json_path, md_path


# --------------------------------------------------------------------------------------- exclusions


@dataclass(frozen=True)
class Exclusions:
    """Training items to drop, keyed so that they survive re-reading a dataset.

    Attributes:
        images: ``(dataset name, image file)`` of each training image to drop with its captions.
        captions: ``(dataset name, image file, normalised caption)`` of each training caption to drop.
        conflicts: for the entries that record it, the ``"dataset/split"`` items it collides with
            (key: the entry's tuple from ``images`` or ``captions``).
        source: the file they were read from, if any.
    """

    images: frozenset[tuple[str, str]] = frozenset()
    captions: frozenset[tuple[str, str, str]] = frozenset()
    conflicts: Mapping[tuple[str, ...], frozenset[str]] = field(default_factory=dict, compare=False, hash=False)
    source: Path | None = field(default=None, compare=False)

    def datasets(self) -> set[str]:
        """Names of the datasets the exclusions mention."""
        return {n for n, _ in self.images} | {n for n, _, _ in self.captions}

    def restricted_to(self, eval_splits: Iterable[str]) -> Exclusions:
        """Only the entries that collide with one of ``eval_splits``; entries that record no conflict are kept.

        ``eval_splits`` are ``"dataset/split"`` (``"rsitmd/test"``) or a dataset name for all its
        evaluation splits (``"rsitmd"``). Training on UCM to test on RSITMD,
        ``exclusions.restricted_to(["rsitmd/test"])`` drops only what RSITMD's test split shares.
        """
        wanted = set(eval_splits)

        def keep(key: tuple[str, ...]) -> bool:
            found = self.conflicts.get(key)
            return not found or any(c in wanted or c.split("/", 1)[0] in wanted for c in found)

        return Exclusions(images=frozenset(k for k in self.images if keep(k)),
                          captions=frozenset(k for k in self.captions if keep(k)),
                          conflicts=self.conflicts, source=self.source)


_IMAGE_KEYS = {"dataset", "image", "conflicts"}
_CAPTION_KEYS = _IMAGE_KEYS | {"caption"}


def _entries(path: Path, block: Mapping[str, Any], kind: str, required: tuple[str, ...], valid: set[str],
             conflicts: dict[tuple[str, ...], frozenset[str]]) -> list[tuple[str, ...]]:
    """The key tuples of ``block[kind]``; each entry's ``conflicts`` list goes into ``conflicts``."""
    items = block.get(kind, [])
    if not isinstance(items, list):
        raise DatasetError(path, f"exclusions.{kind} must be a list")
    keys = []
    for k, item in enumerate(items):
        where = f"exclusions.{kind}[{k}]"
        if not isinstance(item, dict):
            raise DatasetError(path, f"{where} must be an object with {', '.join(required)}")
        unknown = sorted(set(item) - valid)
        if unknown:
            raise DatasetError(path, f"{where} has unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        for key in required:
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise DatasetError(path, f"{where} needs a non-empty string {key!r}")
        key_tuple = tuple(item[key] if key != "caption" else normalise_caption(item[key]) for key in required)
        found = item.get("conflicts", [])
        if not isinstance(found, list) or not all(isinstance(c, str) for c in found):
            raise DatasetError(path, f"{where}: conflicts must be a list of \"dataset/split\" strings")
        if found:
            conflicts[key_tuple] = conflicts.get(key_tuple, frozenset()) | frozenset(found)
        keys.append(key_tuple)
    return keys


def _exclusions_of(block: Mapping[str, Any]) -> Exclusions:
    """The Exclusions of a report's own (already valid) ``exclusions`` block."""
    conflicts: dict[tuple[str, ...], frozenset[str]] = {}
    for e in block["images"]:
        conflicts[(e["dataset"], e["image"])] = frozenset(e["conflicts"])
    for e in block["captions"]:
        conflicts[(e["dataset"], e["image"], e["caption"])] = frozenset(e["conflicts"])
    return Exclusions(images=frozenset((e["dataset"], e["image"]) for e in block["images"]),
                      captions=frozenset((e["dataset"], e["image"], e["caption"]) for e in block["captions"]),
                      conflicts=conflicts)


def read_exclusions(path: str | Path) -> Exclusions:
    """Read the training items to drop from an ``audit.json``, or from a hand-written file of the same schema.

    The file needs only the ``"exclusions"`` part of ``audit.json``::

        {"exclusions": {"images":   [{"dataset": "ucm", "image": "102.webp"}],
                        "captions": [{"dataset": "rsicd", "image": "00013.jpg",
                                      "caption": "many buildings are in a dense residential area"}]}}

    Each entry may also carry ``"conflicts"``, the ``"dataset/split"`` items it collides with
    (:meth:`Exclusions.restricted_to` selects by them). Captions are normalised on reading, so
    raw text works too. Either list may be absent.

    Raises:
        DatasetError: one line naming the file: missing, not JSON, another ``format``, no
            ``exclusions`` object, or an entry without its string fields or with unknown keys.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("exclusions"), dict):
        raise DatasetError(path, 'not an audit file: expected a JSON object with an "exclusions" object '
                                 '(as written by rsitr data audit)')
    if data.get("format", FORMAT) != FORMAT:
        raise DatasetError(path, f"format {data.get('format')!r} is not {FORMAT!r}")
    block = data["exclusions"]
    unknown = sorted(set(block) - {"images", "captions"})
    if unknown:
        raise DatasetError(path, f"exclusions has unknown key(s) {', '.join(unknown)}; valid: captions, images")
    conflicts: dict[tuple[str, ...], frozenset[str]] = {}
    images = _entries(path, block, "images", ("dataset", "image"), _IMAGE_KEYS, conflicts)
    captions = _entries(path, block, "captions", ("dataset", "image", "caption"), _CAPTION_KEYS, conflicts)
    return Exclusions(images=frozenset((n, f) for n, f in images),
                      captions=frozenset((n, f, t) for n, f, t in captions), conflicts=conflicts, source=path)


#: The split excluded training images are moved to; no run trains, selects or reports on it.
EXCLUDED_SPLIT = "excluded"


def apply_exclusions(
    dataset: RetrievalDataset, exclusions: Exclusions, train_split: str = "train"
) -> tuple[RetrievalDataset, dict[str, int]]:
    """``dataset`` without the excluded training images and captions; val and test untouched.

    Only entries whose dataset name equals ``dataset.name`` apply, and only to images of split
    ``train_split``: an excluded image leaves the training split for the split
    :data:`EXCLUDED_SPLIT` with all its captions removed (the image stays in the list, so the
    dataset's feature cache stays valid), an excluded caption (image file + normalised text; every
    training caption of that image with that text) is dropped alone. A training image left with no caption by the caption exclusions is dropped too (no
    caption could retrieve it). Images and captions keep their order; every image and caption of
    the other splits is kept exactly as it was. Entries naming an image of another split are
    ignored and counted; entries matching nothing are counted and logged.

    Args:
        dataset: the dataset to clean.
        exclusions: from :func:`read_exclusions` (or built directly).
        train_split: the split items may be dropped from.

    Returns:
        ``(cleaned dataset, counts)`` with counts ``images_dropped`` (listed + emptied),
        ``images_listed``, ``images_emptied``, ``captions_dropped`` (all captions removed,
        those of dropped images included), ``captions_listed`` (listed captions removed from kept
        or emptied images), ``entries_not_train`` and ``entries_unmatched``.
    """
    return _apply(dataset, exclusions, train_split, warn=True)


def _apply(dataset: RetrievalDataset, exclusions: Exclusions, train_split: str, warn: bool
           ) -> tuple[RetrievalDataset, dict[str, int]]:
    name = dataset.name
    image_entries = {f for n, f in exclusions.images if n == name}
    caption_entries = {(f, t) for n, f, t in exclusions.captions if n == name}
    if warn and (exclusions.images or exclusions.captions) and not (image_entries or caption_entries):
        logger.warning("exclusions%s name no item of dataset %r (they name %s)",
                       f" of {exclusions.source}" if exclusions.source else "", name, ", ".join(sorted(exclusions.datasets())))

    train_ids: dict[str, list[int]] = defaultdict(list)
    other_files: set[str] = set()
    for i, (f, s) in enumerate(zip(dataset.image_files, dataset.image_splits)):
        if s == train_split:
            train_ids[f].append(i)
        else:
            other_files.add(f)

    drop_images: set[int] = set()
    not_train = unmatched = 0
    for f in image_entries:
        if f in train_ids:
            drop_images.update(train_ids[f])
        elif f in other_files:
            not_train += 1
        else:
            unmatched += 1

    captions_of: dict[int, list[int]] = defaultdict(list)
    for c, i in enumerate(dataset.caption_image.tolist()):
        captions_of[i].append(c)
    drop_captions: set[int] = set()
    listed = 0
    for f, text in caption_entries:
        if f not in train_ids:
            if f in other_files:
                not_train += 1
            else:
                unmatched += 1
            continue
        hits = [c for i in train_ids[f] for c in captions_of[i] if normalise_caption(dataset.captions[c]) == text]
        if not hits:
            unmatched += 1
        for c in hits:
            if int(dataset.caption_image[c]) not in drop_images:
                drop_captions.add(c)
                listed += 1
    emptied = {i for i in {int(dataset.caption_image[c]) for c in drop_captions}
               if all(c in drop_captions for c in captions_of[i])}
    drop_images |= emptied
    for i in drop_images:
        drop_captions.update(captions_of[i])
    if warn and unmatched:
        logger.warning("%s: %d exclusion entries match no %s item (other file names or captions?)", name, unmatched, train_split)

    kept_caps = [c for c in range(dataset.num_captions) if c not in drop_captions]
    cleaned = RetrievalDataset(
        name=dataset.name,
        image_dir=dataset.image_dir,
        image_files=list(dataset.image_files),
        image_splits=[EXCLUDED_SPLIT if i in drop_images else s for i, s in enumerate(dataset.image_splits)],
        captions=[dataset.captions[c] for c in kept_caps],
        caption_image=dataset.caption_image[kept_caps],
        scene_labels=dataset.scene_labels,
        keywords=None if dataset.keywords is None else [dataset.keywords[c] for c in kept_caps],
        source=dataset.source,
    )
    counts = {
        "images_dropped": len(drop_images),
        "images_listed": len(drop_images) - len(emptied),
        "images_emptied": len(emptied),
        "captions_dropped": len(drop_captions),
        "captions_listed": listed,
        "entries_not_train": not_train,
        "entries_unmatched": unmatched,
    }
    return cleaned, counts
