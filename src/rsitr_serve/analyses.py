"""DOVE's analyses of a trained model on one dataset split (Sec. IV-D-3 and IV-F, Figs. 7–10), as a report.

``rsitr analyze RUN_OR_MODEL --split test --out DIR`` (:func:`analyze`) scores every image of the
split against every caption, as ``rsitr evaluate`` does, and writes ``DIR/index.html`` (static, no
script, figures referenced by relative path), one PNG per figure, and ``DIR/analysis.json`` with
every number the page shows. Sections:

* **overview**: the split's recalls (:func:`rsitr.evaluation.recall_metrics`).
* **significant vs insignificant** (Fig. 7): the split divided by whether an image holds salient
  objects, each part evaluated as a retrieval set of its own, beside the full split.
* **qualitative top-5** (Fig. 8): for seeded random queries, the top-5 sentences of an image and
  the top-5 images of a sentence; true matches green, wrong ones red.
* **embedding distances** (Fig. 9): for every positive pair of the split, six Euclidean distances
  between DOVE's named embeddings (:meth:`rsitr.models.base.RetrievalModel.pair_embeddings`) as
  box plots, and whether the paper's three inequalities hold.
* **t-SNE** (Fig. 10): the final visual and textual embeddings, coloured by scene class.
* **scene classes**: recall of each class's queries against the full split, and the confusion of
  scene classes among the top-1 images of sentence queries (the paper's "dense vs medium
  residential" remark, Sec. IV-F-3).

A section that does not apply (no division given, a model without named embeddings, a dataset
without scene labels) says why instead of failing.

Choices (the paper is silent on each):

* **The division** (Sec. IV-A-1: significant = the RoI encoder detects objects, then manual
  filtering). An image is *significant* when its detections entry has at least one box scoring
  above ``score_threshold`` whose label is not one of ``ignored_labels``; images without an entry
  are insignificant. By default ``road`` and ``tree`` are ignored: on the synthetic dataset (whose
  ``detections.json`` holds the true objects) every image has objects, but roads and runways (one
  class, ``road``) cross the whole scene and trees are land cover, the stuff of the scenes DOVE's
  Fig. 5 calls insignificant (forest, farmland, river, desert); buildings, planes, ships, storage
  tanks and cars count. Boxes without a label always count. A user's list of significant image
  names replaces the detections (the paper's manual filtering).
* **Each part is its own retrieval set** (Fig. 7 evaluates "the significant test set"): the score
  submatrix of its images and their captions, so the ranks inside a part never see the other part.
* **Region boxes** of the encoded images: a run's own detections file (``features.detections`` of
  its ``model.json``), as its evaluation used; a bundle records none, so its images get its box
  source (grid or activation proposals), as ``rsitr index`` encodes tiles. The division's
  detections file only divides.
* **Distances** are between unit-normalised embeddings: every score is a cosine, so only
  directions matter, and ``d = sqrt(2 - 2 cos)`` makes d(V_MR, T_RG) the final score's own
  distance. Each inequality is reported on the means, the medians and as the fraction of pairs for
  which it holds. The regional embedding V_R is DOVE's choice (:meth:`rsitr.models.dove.DOVE.pair_embeddings`):
  F'_R, the very term Eq. 27 adds to the text, so d(V_R, T_RG) < d(V_R, T_G) partly holds by
  construction, even at random weights; the report of an untrained model (e.g. a random-weight
  bundle) is the baseline the three inequalities should be read against.
* **Final embeddings for t-SNE**: a model that names them (:attr:`~rsitr.models.base.RetrievalModel.final_pair`;
  DOVE: V_MR and, per caption, T_RG guided by its own image) — a pairwise model has no text
  embedding without a candidate image, and the true pair's is the one its score ranks, so
  matching pairs lie closer than with T_G by construction; otherwise a separable first stage
  (:meth:`rsitr.bundle.RetrievalBundle.first_stage`; for a separable model, its score's own
  embeddings). Unit-normalised, at most ``max_points`` points: whole images with all their
  captions, drawn in a seeded order. t-SNE (``sklearn.manifold.TSNE``): PCA initialisation (a
  stable global layout, so in practice the seed acts through the sample only; it is passed as
  ``random_state`` too), perplexity ``min(30, (n - 1) / 3)``.
* **Confusion**: the top-1 image of a sentence query is the highest score, ties to the lower image
  index (``numpy.argmax``); rows are the query's true class, normalised to sum to 1.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.bundle import MANIFEST, RUN_CONFIG, RetrievalBundle, load_model
from rsitr.data import load_dataset
from rsitr.data.dataset import RetrievalDataset
from rsitr.data.images import to_rgb
from rsitr.data.splits import apply_assignment
from rsitr.devices import to_device
from rsitr.errors import ConfigError, DatasetError
from rsitr.evaluation import RECALL_KS, i2t_ranks, recall_metrics, t2i_ranks
from rsitr.features.detections import Detections, lookup, read_detections
from rsitr.io import atomic_path, check_writable, read_json, read_yaml_mapping, write_json, write_text
from rsitr.models.base import Encoding, take_rows
from rsitr.progress import get_logger, progress_bar
from rsitr.text import distinct_rows

logger = get_logger(__name__)

#: Written by ``rsitr train`` beside ``config.yaml``: the split of every image the run used.
RUN_SPLITS = "splits.json"
#: Detection labels that are not salient objects by default (see the module docstring).
DEFAULT_IGNORED_LABELS: tuple[str, ...] = ("road", "tree")
DEFAULT_SCORE_THRESHOLD = 0.5
MAX_TSNE_POINTS = 2000
TOP_K = 5
#: DOVE's embeddings of Fig. 9 and the six distances between them, in the order plotted.
DISTANCES: tuple[tuple[str, str], ...] = (
    ("V_MR", "T_RG"), ("V_M", "T_G"), ("V_R", "V_MR"), ("V_R", "V_M"), ("V_R", "T_RG"), ("V_R", "T_G"),
)
#: The paper's three inequalities (Sec. IV-F-2): the first distance is smaller than the second.
INEQUALITIES: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("V_MR", "T_RG"), ("V_M", "T_G")), (("V_R", "V_MR"), ("V_R", "V_M")), (("V_R", "T_RG"), ("V_R", "T_G")),
)
RECALL_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR")
RECALL_NAMES = ("i2t R@1", "i2t R@5", "i2t R@10", "t2i R@1", "t2i R@5", "t2i R@10", "mR")
GREEN, RED = "#1a9641", "#d7191c"
#: The report's sections, in page order: their ``id`` in ``index.html`` and key in ``analysis.json``.
SECTION_KEYS = ("overview", "significance", "qualitative", "distances", "tsne", "scenes")
PAIR_CHUNK = 1024


# ----------------------------------------------------------------------------------- inputs


def report_split(dataset: RetrievalDataset) -> str:
    """The split a report shows by default: ``test`` when the dataset has one, else ``val``.

    A run chooses its checkpoint on ``val`` when a test split exists (and on a split carved from
    train otherwise), so this is the split its figures are honest on (:mod:`rsitr.data.splits`).
    """
    splits = dataset.splits()
    for name in ("test", "val"):
        if name in splits:
            return name
    raise ConfigError(f"dataset {dataset.name!r} has no test or val split (has: {', '.join(splits)}); give --split")


def resolve_split(dataset: RetrievalDataset, split: str | None) -> str:
    """``split``, or the report split; a one-line ConfigError naming the splits present when it is absent."""
    if split is None:
        return report_split(dataset)
    if split not in dataset.splits():
        raise ConfigError(f"dataset {dataset.name!r} has no {split!r} split (has: {', '.join(dataset.splits())})")
    return split


def is_run_directory(path: str | Path) -> bool:
    """Whether ``path`` is a run directory of ``rsitr train`` (a run config and no bundle manifest)."""
    folder = Path(path)
    return (folder / RUN_CONFIG).is_file() and not (folder / MANIFEST).is_file()


def analysis_dataset(model_path: str | Path, dataset: str | Path | None = None) -> RetrievalDataset:
    """The dataset to analyse: ``dataset``, or the one a run's ``config.yaml`` names (``data.path``).

    For a run, its layout, image folder and name settings apply to either path (as ``rsitr
    evaluate --dataset`` does), and its stored split assignment (``splits.json``), so the split
    is the one it was evaluated on. A bundle knows no dataset: ``dataset`` is then required.
    """
    if not is_run_directory(model_path):
        if dataset is None:
            raise ConfigError(f"{model_path}: a model bundle names no dataset; give --dataset PATH")
        return load_dataset(dataset)
    config = Path(model_path) / RUN_CONFIG
    data = read_yaml_mapping(config, "a run config must be a mapping of sections").get("data") or {}
    path = dataset if dataset is not None else data.get("path")
    if not path:
        raise ConfigError(f"{config}: the run config names no dataset (data.path); give --dataset PATH")
    loaded = load_dataset(path, layout=str(data.get("layout") or "auto"), image_dir=data.get("image_dir"), name=data.get("name"))
    splits = Path(model_path) / RUN_SPLITS
    return apply_assignment(loaded, splits) if splits.is_file() else loaded


@dataclass
class SplitScores:
    """One split, encoded and scored.

    Attributes:
        dataset: the split's images and captions, renumbered from 0.
        split: its name.
        sims: (n_images, n_captions) float32 scores, as ``rsitr evaluate`` computes them.
        image_of_caption: (n_captions,) image index of each caption.
        images: the model's image encodings (row = image).
        texts: the model's text encodings, one row per caption.
    """

    dataset: RetrievalDataset
    split: str
    sims: np.ndarray
    image_of_caption: np.ndarray
    images: Encoding
    texts: Encoding


def region_boxes(bundle: RetrievalBundle, dataset: RetrievalDataset) -> tuple[list[np.ndarray | None], list[np.ndarray | None]] | None:
    """Boxes and scores of each image from the run's own detections file, or None (the bundle's box source)."""
    path = bundle.feature_spec.detections
    if path is None:
        return None
    detections = read_detections(path)
    entries = [lookup(detections, name) for name in dataset.image_files]
    return [None if e is None else e[0] for e in entries], [None if e is None else e[1] for e in entries]


def encode_split(bundle: RetrievalBundle, split_data: RetrievalDataset, split: str, progress: bool = True) -> SplitScores:
    """Encode and score a split as evaluation does: each distinct caption input once, its scores copied.

    Equal captions thus tie exactly (see :mod:`rsitr.evaluation`, "Exactness").
    """
    boxes = region_boxes(bundle, split_data)
    paths = [split_data.image_path(i) for i in range(split_data.num_images)]
    images = bundle.encode_images(paths, None if boxes is None else boxes[0], None if boxes is None else boxes[1],
                                  progress=progress)
    tokens, lengths, extras = bundle.tokenize(split_data.captions)
    first, inverse = distinct_rows(tokens, lengths, extras)
    distinct = bundle.encode_texts([split_data.captions[int(c)] for c in first])
    sims = bundle.score(images, distinct, progress=progress)[:, inverse]
    return SplitScores(dataset=split_data, split=split, sims=sims.numpy(), image_of_caption=split_data.caption_image.copy(),
                       images=images, texts=take_rows(distinct, inverse.to(next(iter(distinct.values())).device)))


# --------------------------------------------------------------------- significant division


def read_detection_labels(path: str | Path) -> dict[str, list[str] | None]:
    """The optional ``labels`` of every image of a detections file (validated by :func:`read_detections`)."""
    images = read_json(path)["images"]
    return {str(name): None if entry.get("labels") is None else [str(x) for x in entry["labels"]]
            for name, entry in images.items()}


def significant_from_detections(image_files: Sequence[str], detections: Detections,
                                labels: dict[str, list[str] | None], threshold: float,
                                ignored: Sequence[str] = DEFAULT_IGNORED_LABELS) -> np.ndarray:
    """Per image: whether it has a box scoring above ``threshold`` with a label not in ``ignored``.

    Images are looked up as :func:`rsitr.features.detections.lookup` does (relative name, then
    base name); an image without an entry is insignificant; unlabelled boxes always count.
    """
    ignore = set(ignored)
    out = np.zeros(len(image_files), dtype=bool)
    for i, name in enumerate(image_files):
        entry = lookup(detections, name)
        if entry is None:
            continue
        names = labels.get(name, labels.get(Path(name).name))
        keep = entry[1] > threshold
        if names is not None:
            keep &= np.array([label not in ignore for label in names], dtype=bool)
        out[i] = bool(keep.any())
    return out


def read_name_list(path: str | Path) -> list[str]:
    """Image names of a text file, one per line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "list of significant images not found")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot read the list of significant images ({exc.__class__.__name__})") from exc
    names = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not names:
        raise DatasetError(path, "the list of significant images names no image")
    return names


def significant_from_names(image_files: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Per image: whether its relative name or its base name is in ``names``."""
    wanted = set(names)
    return np.array([f in wanted or Path(f).name in wanted for f in image_files], dtype=bool)


@dataclass
class Division:
    """Which images of the split are significant, and how that was decided."""

    significant: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)


def significant_from_classes(split_data: RetrievalDataset, classes: Sequence[str]) -> Division:
    """Significant = the image's scene class is one of ``classes`` (for datasets without detections, e.g. UCM).

    A class-level stand-in for the paper's detector-then-manual division: scene classes defined by
    salient objects (airplane, storage tanks, tennis court …) against those of land cover alone.
    """
    labels = split_data.scene_labels
    if labels is None:
        raise ConfigError(f"dataset {split_data.name!r} carries no scene labels: --significant-classes needs them")
    known = sorted(set(labels))
    unknown = [c for c in classes if c not in known]
    if unknown:
        raise ConfigError(f"--significant-classes: {', '.join(unknown)} not a scene class of this split "
                          f"(classes: {', '.join(known)})")
    mask = np.array([label in set(classes) for label in labels], dtype=bool)
    return Division(mask, f"scene classes {', '.join(classes)}")


def divide_split(split_data: RetrievalDataset, detections: str | Path | None, threshold: float,
                 ignored: Sequence[str], names_file: str | Path | None,
                 classes: Sequence[str] | None = None) -> Division | None:
    """The significant/insignificant division of the split from classes, a list of names or a detections file."""
    files = split_data.image_files
    if classes:
        return significant_from_classes(split_data, classes)
    if names_file is not None:
        names = read_name_list(names_file)
        mask = significant_from_names(files, names)
        if not mask.any():
            raise DatasetError(names_file, f"none of its {len(names)} names is an image of this split "
                                           f"(e.g. {files[0]!r}); list dataset image names, one per line")
        return Division(mask, f"list of significant images {Path(names_file).name}",
                        [f"{len(names) - int(mask.sum())} listed names are not images of this split"])
    if detections is None:
        return None
    found = read_detections(detections)
    mask = significant_from_detections(files, found, read_detection_labels(detections), threshold, ignored)
    missing = sum(lookup(found, f) is None for f in files)
    ignored_text = ", ".join(ignored) if ignored else "none"
    return Division(mask, f"detections {Path(detections).name}: a box scoring above {threshold:g}, labels ignored: {ignored_text}",
                    [f"{missing} images have no detections entry (insignificant)"] if missing else [])


# ----------------------------------------------------------------------- pure computations


def subset_metrics(sims: np.ndarray, image_of_caption: np.ndarray, keep: np.ndarray) -> dict[str, float] | None:
    """Recalls of the images ``keep`` (bool per image) and their captions as a retrieval set of their own.

    None when no image is kept.
    """
    images = np.flatnonzero(keep)
    if not len(images):
        return None
    new_index = np.full(len(keep), -1, dtype=np.int64)
    new_index[images] = np.arange(len(images))
    captions = np.flatnonzero(keep[image_of_caption])
    return recall_metrics(sims[np.ix_(images, captions)], new_index[image_of_caption[captions]])


def division_table(sims: np.ndarray, image_of_caption: np.ndarray, significant: np.ndarray) -> dict[str, dict[str, Any]]:
    """Fig. 7: metrics and sizes of the full split, its significant and its insignificant part."""
    parts = {"full": np.ones(len(significant), dtype=bool), "significant": significant, "insignificant": ~significant}
    return {name: {"n_images": int(keep.sum()), "n_captions": int(keep[image_of_caption].sum()),
                   "metrics": subset_metrics(sims, image_of_caption, keep)} for name, keep in parts.items()}


def _recalls(ranks: np.ndarray) -> dict[int, float]:
    return {k: 100.0 * float(np.mean(ranks < k)) if len(ranks) else float("nan") for k in RECALL_KS}


def per_class_recall(sims: np.ndarray, image_of_caption: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Recall of each scene class's queries against the FULL split.

    i2t: the class's images as queries among all captions; t2i: their captions as queries among
    all images (ranks of :func:`rsitr.evaluation.i2t_ranks` / :func:`~rsitr.evaluation.t2i_ranks`,
    strict ties). ``mR`` is the mean of the six recalls.
    """
    i2t, t2i = i2t_ranks(sims, image_of_caption), t2i_ranks(sims, image_of_caption)
    label_array = np.asarray([str(x) for x in labels])
    out: dict[str, dict[str, float]] = {}
    for name in sorted(set(label_array.tolist())):
        images = label_array == name
        captions = images[image_of_caption]
        row: dict[str, float] = {"n_images": int(images.sum()), "n_captions": int(captions.sum())}
        for direction, ranks in (("i2t", i2t[images]), ("t2i", t2i[captions])):
            row.update({f"{direction}_r{k}": v for k, v in _recalls(ranks).items()})
        row["mR"] = float(np.mean([row[c] for c in RECALL_COLUMNS[:-1]]))
        out[name] = row
    return out


def scene_confusion(sims: np.ndarray, image_of_caption: np.ndarray, labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Classes and (n_classes, n_classes) counts: row = a sentence query's true class, column = its top-1 image's class."""
    label_array = np.asarray([str(x) for x in labels])
    classes = sorted(set(label_array.tolist()))
    index = {name: i for i, name in enumerate(classes)}
    true = np.array([index[x] for x in label_array[image_of_caption]], dtype=np.int64)
    top = np.array([index[x] for x in label_array[np.argmax(sims, axis=0)]], dtype=np.int64)
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, (true, top), 1)
    return classes, counts


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows summing to 0 stay 0)."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)


def top_confusions(classes: Sequence[str], counts: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
    """The ``k`` most frequent off-diagonal (true class, top-1 class) pairs, by count, then rate, then name."""
    rates = row_normalised(counts)
    pairs = [(int(counts[i, j]), float(rates[i, j]), classes[i], classes[j])
             for i in range(len(classes)) for j in range(len(classes)) if i != j and counts[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], -p[1], p[2], p[3]))
    return [{"true": t, "top1": p, "count": c, "rate": r} for c, r, t, p in pairs[:k]]


def unit_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Row-wise Euclidean distance of unit-normalised rows: ``sqrt(2 - 2 cos)`` in [0, 2]."""
    x = torch.nn.functional.normalize(torch.as_tensor(a).double(), dim=-1)
    y = torch.nn.functional.normalize(torch.as_tensor(b).double(), dim=-1)
    return torch.linalg.vector_norm(x - y, dim=-1).numpy()


def embedding_distances(pairs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The six distances of Fig. 9 for every pair, keyed ``d(A,B)``."""
    return {distance_name(a, b): unit_distance(pairs[a], pairs[b]) for a, b in DISTANCES}


def distance_name(a: str, b: str) -> str:
    return f"d({a},{b})"


def summarise(values: np.ndarray) -> dict[str, float]:
    """Mean, median, quartiles and range of a sample (what a box plot shows)."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"mean": float(np.mean(values)), "median": float(median), "q1": float(q1), "q3": float(q3),
            "min": float(np.min(values)), "max": float(np.max(values)), "n": int(len(values))}


def check_inequalities(distances: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Each inequality ``lhs < rhs`` of Sec. IV-F-2 on the means, the medians, and per pair (fraction)."""
    rows = []
    for left, right in INEQUALITIES:
        lhs, rhs = distances[distance_name(*left)], distances[distance_name(*right)]
        rows.append({"inequality": f"{distance_name(*left)} < {distance_name(*right)}",
                     "mean_lhs": float(lhs.mean()), "mean_rhs": float(rhs.mean()), "holds_on_means": bool(lhs.mean() < rhs.mean()),
                     "median_lhs": float(np.median(lhs)), "median_rhs": float(np.median(rhs)),
                     "holds_on_medians": bool(np.median(lhs) < np.median(rhs)), "fraction_of_pairs": float(np.mean(lhs < rhs))})
    return rows


def choose_queries(n: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices of ``range(n)``, seeded, in increasing order."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=min(count, n), replace=False))


def top_indices(scores: np.ndarray, k: int = TOP_K) -> list[int]:
    """Indices of the ``k`` highest scores, ties to the lower index."""
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


def sample_for_tsne(image_of_caption: np.ndarray, n_images: int, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole images with all their captions, in a seeded order, while images + captions fit ``max_points``.

    Only images with at least one caption (a positive pair) are drawn. Returns the chosen image
    ids and caption ids, each sorted.
    """
    counts = np.bincount(image_of_caption, minlength=n_images)
    chosen, total = [], 0
    for image in np.random.default_rng(seed).permutation(n_images):
        if counts[image] == 0:
            continue
        if total + 1 + counts[image] > max_points:
            break
        chosen.append(int(image))
        total += 1 + int(counts[image])
    images = np.array(sorted(chosen), dtype=np.int64)
    return images, np.flatnonzero(np.isin(image_of_caption, images))


def tsne_layout(points: np.ndarray, seed: int) -> np.ndarray:
    """2-D t-SNE of unit-normalised rows (``sklearn.manifold.TSNE``, seeded; perplexity ``min(30, (n-1)/3)``)."""
    from sklearn.manifold import TSNE

    unit = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    perplexity = min(30.0, (len(points) - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(unit.astype(np.float64))


# --------------------------------------------------------------------- model embeddings


@torch.no_grad()
def positive_pair_embeddings(bundle: RetrievalBundle, data: SplitScores, progress: bool = True) -> dict[str, torch.Tensor]:
    """The model's named embeddings of every positive pair (caption c with its image), on the CPU, float32.

    Raises NotImplementedError when the model does not name them.
    """
    model = bundle.model.eval()
    rows = torch.as_tensor(data.image_of_caption)
    parts: list[dict[str, torch.Tensor]] = []
    for start in progress_bar(range(0, len(rows), PAIR_CHUNK), desc="pair embeddings", unit="chunk", enabled=progress):
        chunk = slice(start, start + PAIR_CHUNK)
        images = to_device(_float(take_rows(data.images, rows[chunk].to(_device(data.images)))), bundle.device)
        texts = to_device(_float(take_rows(data.texts, slice(start, start + PAIR_CHUNK))), bundle.device)
        parts.append({k: v.float().cpu() for k, v in model.pair_embeddings(images, texts).items()})
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _float(encoding: Encoding) -> Encoding:
    return {k: v.float() if v.is_floating_point() else v for k, v in encoding.items()}


def _device(encoding: Encoding) -> torch.device:
    return next(iter(encoding.values())).device


# ------------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out, write atomically as PNG, and release the figure."""
    plt = _pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_division(table: dict[str, dict[str, Any]], path: Path) -> None:
    """Fig. 7: grouped bars of the six recalls and mR for the full, significant and insignificant sets."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.8))
    names = [n for n, row in table.items() if row["metrics"] is not None]
    width = 0.8 / max(1, len(names))
    x = np.arange(len(RECALL_COLUMNS))
    for k, name in enumerate(names):
        values = [table[name]["metrics"][c] for c in RECALL_COLUMNS]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, values, width, label=f"{name} ({table[name]['n_images']} images)")
    ax.set_xticks(x, RECALL_NAMES)
    ax.set_ylabel("%")
    ax.legend()
    _save_png(fig, path)


def _thumbnail(path: Path, size: int = 160) -> np.ndarray:
    picture = to_rgb(path)
    picture.thumbnail((size, size))
    return np.asarray(picture)


def _framed(ax: Any, pixels: np.ndarray, colour: str | None) -> None:
    ax.imshow(pixels)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(5)


def plot_sentence_retrieval(rows: list[dict[str, Any]], data: RetrievalDataset, path: Path) -> None:
    """Fig. 8(a): per image query, its thumbnail and its top-5 sentences (green true, red wrong)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.3 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 4]})
    for (ax_image, ax_text), row in zip(axes, rows):
        _framed(ax_image, _thumbnail(data.image_path(row["query"])), None)
        ax_image.set_title(_short(row["name"], 24), fontsize=8)
        ax_text.axis("off")
        for k, hit in enumerate(row["top"]):
            line = f"{k + 1}. ({hit['score']:.3f}) " + _short(hit["text"], 110)
            ax_text.text(0.0, 0.9 - 0.2 * k, line, color=GREEN if hit["correct"] else RED, fontsize=8,
                         transform=ax_text.transAxes, va="top")
    _save_png(fig, path)


def plot_image_retrieval(rows: list[dict[str, Any]], data: RetrievalDataset, path: Path) -> None:
    """Fig. 8(b): per sentence query, the sentence and its top-5 images framed green (true) or red (wrong)."""
    plt = _pyplot()
    fig = plt.figure(figsize=(2.2 * TOP_K, 2.9 * len(rows)))
    grid = fig.add_gridspec(2 * len(rows), TOP_K, height_ratios=[0.45, 2.2] * len(rows))
    for r, row in enumerate(rows):
        ax_text = fig.add_subplot(grid[2 * r, :])
        ax_text.axis("off")
        ax_text.text(0.0, 0.5, textwrap.fill(row["text"], 120), fontsize=8, va="center", transform=ax_text.transAxes)
        for k, hit in enumerate(row["top"]):
            ax = fig.add_subplot(grid[2 * r + 1, k])
            _framed(ax, _thumbnail(data.image_path(hit["image"])), GREEN if hit["correct"] else RED)
            ax.set_xlabel(f"{k + 1}. ({hit['score']:.3f})", fontsize=8)
    _save_png(fig, path)


def plot_distances(distances: dict[str, np.ndarray], path: Path) -> None:
    """Fig. 9: box plots of the six distances, the two sides of each inequality side by side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    names = list(distances)
    box = ax.boxplot([distances[n] for n in names], patch_artist=True, showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names)
    colours = ["#4575b4", "#fdae61"] * 3
    for patch, colour in zip(box["boxes"], colours):
        patch.set_facecolor(colour)
    ax.set_ylabel("Euclidean distance of unit vectors")
    _save_png(fig, path)


def plot_tsne(coords: np.ndarray, kinds: Sequence[str], labels: Sequence[str] | None, path: Path) -> None:
    """Fig. 10: t-SNE points coloured by scene class; images filled circles, texts crosses."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 6.5))
    kinds_array = np.asarray(kinds)
    classes = sorted(set(labels)) if labels is not None else ["all"]
    label_array = np.asarray(labels if labels is not None else ["all"] * len(coords))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for c, name in enumerate(classes):
        colour = cmap(c % cmap.N)
        for kind, marker in (("image", "o"), ("text", "x")):
            keep = (label_array == name) & (kinds_array == kind)
            ax.scatter(coords[keep, 0], coords[keep, 1], s=22 if kind == "image" else 14, marker=marker, color=colour,
                       label=name if kind == "image" else None, edgecolors="black" if kind == "image" else None, linewidths=0.4)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("t-SNE: filled circles = images, crosses = sentences")
    if labels is not None and len(classes) <= 25:
        ax.legend(fontsize=7, markerscale=1.2, loc="best")
    _save_png(fig, path)


def plot_confusion(classes: Sequence[str], rates: np.ndarray, path: Path) -> None:
    """Row-normalised confusion of scene classes (true class of a sentence query vs its top-1 image's) as a heat map."""
    plt = _pyplot()
    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set_xlabel("class of the top-1 image")
    ax.set_ylabel("class of the sentence query")
    if len(classes) <= 25:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if rates[i, j] > 0:
                    ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save_png(fig, path)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------ sections


@dataclass
class Section:
    """One part of the report: its JSON key, heading, HTML body and the numbers it shows."""

    key: str
    title: str
    body: str
    record: dict[str, Any]


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "—" if np.isnan(value) else f"{value:.2f}"
        return html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(name: str, alt: str) -> str:
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"></figure>'


def _unavailable(key: str, title: str, reason: str) -> Section:
    return Section(key, title, f'<p class="note">Not available: {html.escape(reason)}</p>', {"available": False, "reason": reason})


def overview_section(bundle: RetrievalBundle, data: SplitScores) -> Section:
    metrics = recall_metrics(data.sims, data.image_of_caption)
    record = {"model": bundle.spec.name, "architecture": bundle.spec.architecture, "dataset": data.dataset.name,
              "split": data.split, "n_images": data.dataset.num_images, "n_captions": data.dataset.num_captions,
              "metrics": metrics}
    body = (f"<p>{html.escape(bundle.spec.name)} ({html.escape(bundle.spec.architecture)}) on {html.escape(data.dataset.name)} "
            f"{html.escape(data.split)}: {data.dataset.num_images} images, {data.dataset.num_captions} captions.</p>"
            + _table(RECALL_NAMES, [[metrics[c] for c in RECALL_COLUMNS]]))
    return Section("overview", "Overview", body, record)


def division_section(data: SplitScores, division: Division | None, out: Path) -> Section:
    title = "Significant and insignificant images (Fig. 7)"
    if division is None:
        return _unavailable("significance", title, "no division given (use --detections FILE or --significant-list FILE)")
    table = division_table(data.sims, data.image_of_caption, division.significant)
    plot_division(table, out / "fig7_significance.png")
    rows = [[name, row["n_images"], row["n_captions"], *([row["metrics"][c] for c in RECALL_COLUMNS] if row["metrics"]
                                                          else [float("nan")] * len(RECALL_COLUMNS))]
            for name, row in table.items()]
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in division.notes)
    body = (f"<p>Division: {html.escape(division.source)}. Each part is evaluated as a retrieval set of its own.</p>{notes}"
            + _table(["set", "images", "captions", *RECALL_NAMES], rows) + _figure("fig7_significance.png", title))
    files = data.dataset.image_files
    record = {"available": True, "source": division.source, "notes": division.notes, "sets": table,
              "significant_images": [files[i] for i in np.flatnonzero(division.significant)]}
    return Section("significance", title, body, record)


def qualitative_section(data: SplitScores, division: Division | None, queries: int, seed: int, out: Path) -> Section:
    """Fig. 8: seeded random image and sentence queries and their top-5 results."""
    ds, sims, owner = data.dataset, data.sims, data.image_of_caption

    def flag(image: int) -> str:
        if division is None:
            return ""
        return " (S)" if division.significant[image] else " (I)"

    image_rows = [{"query": i, "name": ds.image_files[i] + flag(i),
                   "top": [{"caption": c, "text": ds.captions[c], "score": float(sims[i, c]), "correct": bool(owner[c] == i)}
                           for c in top_indices(sims[i])]} for i in choose_queries(ds.num_images, queries, seed)]
    text_rows = [{"query": c, "text": ds.captions[c] + flag(int(owner[c])),
                  "top": [{"image": i, "name": ds.image_files[i], "score": float(sims[i, c]), "correct": bool(i == owner[c])}
                          for i in top_indices(sims[:, c])]} for c in choose_queries(ds.num_captions, queries, seed)]
    plot_sentence_retrieval(image_rows, ds, out / "fig8_sentence_retrieval.png")
    plot_image_retrieval(text_rows, ds, out / "fig8_image_retrieval.png")
    legend = "green = a true match, red = wrong" + ("; (S)/(I) = significant/insignificant query" if division else "")
    body = (f"<p>{queries} seeded random queries per direction (seed {seed}); {legend}.</p>"
            "<h3>(a) Sentence retrieval: image queries</h3>" + _figure("fig8_sentence_retrieval.png", "sentence retrieval")
            + "<h3>(b) Image retrieval: sentence queries</h3>" + _figure("fig8_image_retrieval.png", "image retrieval"))
    return Section("qualitative", "Qualitative top-5 results (Fig. 8)", body,
                   {"available": True, "seed": seed, "image_queries": image_rows, "sentence_queries": text_rows})


def distances_section(pairs: dict[str, torch.Tensor] | None, reason: str, out: Path) -> Section:
    """Fig. 9: the six distances of every positive pair and the three inequalities."""
    title = "Distances between embeddings of positive pairs (Fig. 9)"
    needed = {name for pair in DISTANCES for name in pair}
    if pairs is None or not needed <= set(pairs):
        return _unavailable("distances", title, reason if pairs is None else
                            f"the model's pair embeddings ({', '.join(sorted(pairs))}) are not DOVE's {', '.join(sorted(needed))}")
    distances = embedding_distances(pairs)
    plot_distances(distances, out / "fig9_distances.png")
    summary = {name: summarise(values) for name, values in distances.items()}
    checks = check_inequalities(distances)
    def num(value: float) -> str:
        return f"{value:.3f}"

    body = (f"<p>{len(next(iter(distances.values())))} positive pairs; distances between unit-normalised embeddings "
            "(√(2 − 2 cos)). V_R is the model's regional embedding as it guides the text (DOVE with IGA: F'_R of Eq. 24, which "
            "Eq. 27 adds to the text, so the third inequality partly holds by construction: read it against an "
            "untrained model's report).</p>" + _figure("fig9_distances.png", title)
            + _table(["distance", "mean", "median", "q1", "q3"],
                     [[n, num(s["mean"]), num(s["median"]), num(s["q1"]), num(s["q3"])] for n, s in summary.items()])
            + "<h3>The paper's inequalities</h3>"
            + _table(["inequality", "mean lhs", "mean rhs", "holds (means)", "median lhs", "median rhs", "holds (medians)",
                      "pairs for which it holds"],
                     [[c["inequality"], num(c["mean_lhs"]), num(c["mean_rhs"]), "yes" if c["holds_on_means"] else "no",
                       num(c["median_lhs"]), num(c["median_rhs"]), "yes" if c["holds_on_medians"] else "no",
                       f"{100 * c['fraction_of_pairs']:.1f} %"] for c in checks]))
    return Section("distances", title, body, {"available": True, "summary": summary, "inequalities": checks})


def final_embeddings(bundle: RetrievalBundle, data: SplitScores, pairs: dict[str, torch.Tensor] | None,
                     ) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(per image, per caption) final embeddings and what they are, or None when the model has none."""
    keys = bundle.model.final_pair
    if pairs is not None and keys is not None:
        first_caption = np.full(data.dataset.num_images, -1, dtype=np.int64)
        first_caption[data.image_of_caption[::-1]] = np.arange(len(data.image_of_caption))[::-1]
        visual = pairs[keys[0]].numpy()[np.maximum(first_caption, 0)]
        return visual, pairs[keys[1]].numpy(), f"final pair {keys[0]} / {keys[1]} (each caption's against its own image)"
    if bundle.has_first_stage and bundle.model.first_stage is not None:
        images, texts = bundle.first_stage(data.images, data.texts)
        kind = "the separable embeddings of its score" if not bundle.model.pairwise else "the separable first stage"
        return images.cpu().numpy(), texts.cpu().numpy(), f"{kind} {bundle.model.first_stage[0]} / {bundle.model.first_stage[1]}"
    return None


def tsne_section(bundle: RetrievalBundle, data: SplitScores, pairs: dict[str, torch.Tensor] | None,
                 max_points: int, seed: int, out: Path) -> Section:
    """Fig. 10: seeded t-SNE of the final visual and textual embeddings coloured by scene class."""
    title = "Latent embedding space (Fig. 10)"
    embeddings = final_embeddings(bundle, data, pairs)
    if embeddings is None:
        return _unavailable("tsne", title, f"model {bundle.spec.name!r} names no final embeddings and has no separable stage")
    visual, text, what = embeddings
    images, captions = sample_for_tsne(data.image_of_caption, data.dataset.num_images, max_points, seed)
    if len(images) + len(captions) < 5:
        return _unavailable("tsne", title, f"too few points ({len(images) + len(captions)}) for t-SNE")
    coords = tsne_layout(np.concatenate([visual[images], text[captions]]), seed)
    kinds = ["image"] * len(images) + ["text"] * len(captions)
    scene = data.dataset.scene_labels
    labels = None if scene is None else [scene[i] for i in images] + [scene[int(data.image_of_caption[c])] for c in captions]
    plot_tsne(coords, kinds, labels, out / "fig10_tsne.png")
    note = "" if labels is not None else " The dataset has no scene labels: one colour."
    body = (f"<p>Embeddings: {html.escape(what)}, unit-normalised; {len(images)} images and {len(captions)} sentences "
            f"(seed {seed}).{note}</p>" + _figure("fig10_tsne.png", title))
    points = [{"kind": k, "item": int(i), "label": None if labels is None else labels[n], "x": float(x), "y": float(y)}
              for n, (k, i, (x, y)) in enumerate(zip(kinds, np.concatenate([images, captions]), coords))]
    return Section("tsne", title, body, {"available": True, "embeddings": what, "seed": seed, "points": points})


def scenes_section(data: SplitScores, out: Path, top: int = 5) -> Section:
    """Per-class recall against the full split and the confusion of classes among top-1 images."""
    title = "Scene classes: per-class recall and top-1 confusion"
    labels = data.dataset.scene_labels
    if labels is None:
        return _unavailable("scenes", title, f"dataset {data.dataset.name!r} carries no scene labels")
    per_class = per_class_recall(data.sims, data.image_of_caption, labels)
    classes, counts = scene_confusion(data.sims, data.image_of_caption, labels)
    rates = row_normalised(counts)
    plot_confusion(classes, rates, out / "scene_confusion.png")
    confused = top_confusions(classes, counts, top)
    body = ("<p>Each class's images (i2t) and captions (t2i) as queries against the full split.</p>"
            + _table(["class", "images", "captions", *RECALL_NAMES],
                     [[name, row["n_images"], row["n_captions"], *[row[c] for c in RECALL_COLUMNS]] for name, row in per_class.items()])
            + "<h3>Confusion among top-1 images of sentence queries</h3>" + _figure("scene_confusion.png", "confusion")
            + (_table(["query class", "top-1 image class", "queries", "share of the class's queries"],
                      [[c["true"], c["top1"], c["count"], f"{100 * c['rate']:.1f} %"] for c in confused])
               if confused else '<p class="note">No sentence query has a top-1 image of another class.</p>'))
    return Section("scenes", title, body, {"available": True, "per_class": per_class, "classes": classes,
                                           "confusion_counts": counts.tolist(), "confusion_rates": rates.tolist(),
                                           "top_confusions": confused})


# ------------------------------------------------------------------------------- report


def json_ready(value: Any) -> Any:
    """``value`` with NaN floats as None (JSON has no NaN) and numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.35rem; } h2 { font-size: 1.1rem; margin-top: 2rem; border-bottom: 1px solid #ddd; } h3 { font-size: 0.95rem; }
table { border-collapse: collapse; font-size: 0.82rem; margin: 0.6rem 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; } th:first-child, td:first-child { text-align: left; }
figure { margin: 0.6rem 0; } figure img { max-width: 100%; }
.note { color: #666; font-size: 0.85rem; }
"""


def render_page(title: str, sections: Sequence[Section]) -> str:
    """The static HTML page of the sections (figures by relative path, no script)."""
    parts = [f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>\n{s.body}\n</section>' for s in sections]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "\n</body></html>\n")


def default_out_dir(model_path: str | Path, split: str) -> Path:
    """``RUN_DIR/analysis_SPLIT`` for a run directory; ``analysis_SPLIT`` in the working directory for a bundle."""
    return Path(model_path) / f"analysis_{split}" if is_run_directory(model_path) else Path(f"analysis_{split}")


def analyze(model_path: str | Path, out_dir: str | Path | None = None, *, split: str | None = None,
            dataset: str | Path | None = None, detections: str | Path | None = None,
            score_threshold: float = DEFAULT_SCORE_THRESHOLD, significant_list: str | Path | None = None,
            significant_classes: Sequence[str] | None = None,
            ignored_labels: Sequence[str] = DEFAULT_IGNORED_LABELS, queries: int = 2, seed: int = 0,
            max_points: int = MAX_TSNE_POINTS, progress: bool = True, device: str | None = None) -> Path:
    """Write the analyses of a run or bundle on a split to ``out_dir``; returns the path of ``index.html``.

    Without ``detections`` or ``significant_list``, a run's own detections file (if it has one)
    divides the split. Every input is checked before the split is encoded.

    Raises:
        ConfigError: bad arguments, an absent split, or a bundle without ``dataset``.
        DatasetError / CheckpointError: unreadable dataset, division file or model.
    """
    if sum(x is not None and x != [] for x in (detections, significant_list, significant_classes)) > 1:
        raise ConfigError("give one of --detections, --significant-list and --significant-classes")
    if queries < 1 or max_points < 5:
        raise ConfigError(f"queries must be >= 1 and max_points >= 5, got {queries} and {max_points}")
    bundle = load_model(model_path, device=device)
    full = analysis_dataset(model_path, dataset)
    split = resolve_split(full, split)
    split_data = full.split(split)
    if detections is None and significant_list is None and not significant_classes:
        detections = bundle.feature_spec.detections if is_run_directory(model_path) else None
    division = divide_split(split_data, detections, score_threshold, tuple(ignored_labels), significant_list,
                            significant_classes)
    out = check_writable(out_dir if out_dir is not None else default_out_dir(model_path, split), "analysis folder")
    data = encode_split(bundle, split_data, split, progress)
    try:
        pairs: dict[str, torch.Tensor] | None = positive_pair_embeddings(bundle, data, progress)
        reason = ""
    except NotImplementedError as exc:
        pairs, reason = None, str(exc)
    sections = [overview_section(bundle, data), division_section(data, division, out),
                qualitative_section(data, division, queries, seed, out), distances_section(pairs, reason, out),
                tsne_section(bundle, data, pairs, max_points, seed, out), scenes_section(data, out)]
    title = f"rsitr analysis: {bundle.spec.name} on {data.dataset.name} {split}"
    write_json(out / "analysis.json", json_ready({"title": title, **{s.key: s.record for s in sections}}))
    write_text(out / "index.html", render_page(title, sections))
    logger.info("analysis of %s on %s %s written to %s", bundle.spec.name, data.dataset.name, split, out)
    return out / "index.html"
