"""Retrieval metrics and the batch-size-independent scoring loop.

Metric definitions follow the field's reference evaluation (the one AMFMN, GaLR and DOVE report):

* image-to-text (i2t, "sentence retrieval"): an image query is ranked against all captions; its rank
  is the best (smallest) rank among its own captions;
* text-to-image (t2i, "image retrieval"): a caption query is ranked against all images; its rank is
  the rank of its image;
* R@K is the percentage of queries whose 0-based rank is < K; median rank is ``floor(median) + 1``
  and mean rank is ``mean + 1`` (1-based); ``mR`` is the mean of the six recalls and ``rsum`` their
  sum (DSAN's R@sum).

Ties. The reference code ranks with ``np.argsort(scores)[::-1]``, which breaks ties by position
and so can reward a model that gives every candidate the same score (a constant model would score
R@1 = 100 whenever the true item happens to sort first). We break every tie *against* the query
(``ties="strict"``, the default): the rank of the true item is the number of wrong candidates
scoring at least as high as it. Without ties this is exactly the reference rank; with ties it can
only be worse, never better. Ties are common on datasets whose captions repeat (UCM-Captions val
has 1050 captions but 391 distinct texts): captions with the same words score the same against an
image. ``ties="reference"`` reproduces the reference code's order (``np.argsort`` with numpy's
default sort, reversed), to measure how far the rule moves a table (``docs/benchmarks.md``).

Exactness. Scores are computed so that every metric is identical at any chunking: each distinct
text (same tokens and extra inputs) is encoded once and its scores are copied to every caption
that has it, so equal texts tie exactly rather than up to float noise; and both sides are encoded
in fixed chunks of :data:`ENCODE_CHUNK` items, never in a user-chosen batch size, because a
matrix product's last bits depend on its shape.

Distinct texts. :func:`distinct_text_metrics` is an extra view for datasets whose captions
repeat: a query counts as found when it ranks first any candidate with exactly the same text as a
true one. It is never the headline number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rsitr.data.tokenized import SplitData
from rsitr.devices import module_device, to_device
from rsitr.models.base import Encoding, RetrievalModel, concat_encodings, take_rows
from rsitr.precision import autocast
from rsitr.progress import progress_bar
from rsitr.text import distinct_rows

RECALL_KS = (1, 5, 10)
METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
    "mR", "rsum", "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr",
)


def _check_inputs(sims: np.ndarray, image_of_caption: np.ndarray) -> None:
    if sims.ndim != 2:
        raise ValueError(f"sims must be 2-D (n_images, n_captions), got shape {sims.shape}")
    if image_of_caption.shape != (sims.shape[1],):
        raise ValueError(
            f"image_of_caption has shape {image_of_caption.shape}, expected ({sims.shape[1]},)"
        )
    if image_of_caption.min(initial=0) < 0 or image_of_caption.max(initial=0) >= sims.shape[0]:
        raise ValueError("image_of_caption holds an index outside [0, n_images)")
    if not np.isfinite(sims).all():
        raise ValueError("sims contains NaN or infinite values")


TIE_RULES = ("strict", "reference")


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {', '.join(TIE_RULES)}, got {ties!r}")


def _positive_ranks(scores: np.ndarray, positive: np.ndarray, ties: str) -> np.ndarray:
    """0-based rank of the best positive of each row of ``scores`` among the row's candidates.

    ``strict``: the number of negatives scoring at least as high as the best positive.
    ``reference``: the position of the first positive in ``np.argsort(row)[::-1]`` (numpy's default
    sort, as the reference code calls it), so equal scores are ordered by the sort, not the query.
    A row without positives gets rank = number of candidates (never found).
    """
    _check_ties(ties)
    if ties == "strict":
        best = np.where(positive, scores, -np.inf).max(axis=1)
        ranks = ((scores >= best[:, None]) & ~positive).sum(axis=1)
    else:
        order = np.argsort(scores, axis=1)[:, ::-1]
        hits = np.take_along_axis(positive, order, axis=1)
        ranks = hits.argmax(axis=1)
    ranks[~positive.any(axis=1)] = scores.shape[1]
    return ranks


def _own_mask(n_images: int, image_of_caption: np.ndarray) -> np.ndarray:
    own = np.zeros((n_images, len(image_of_caption)), dtype=bool)
    own[image_of_caption, np.arange(len(image_of_caption))] = True
    return own


def i2t_ranks(sims: np.ndarray, image_of_caption: np.ndarray, ties: str = "strict") -> np.ndarray:
    """0-based rank of each image query: its best own caption among all captions (tie rule ``ties``)."""
    return _positive_ranks(sims, _own_mask(sims.shape[0], image_of_caption), ties)


def t2i_ranks(sims: np.ndarray, image_of_caption: np.ndarray, ties: str = "strict") -> np.ndarray:
    """0-based rank of each caption query: its own image among all images (tie rule ``ties``)."""
    return _positive_ranks(sims.T, _own_mask(sims.shape[0], image_of_caption).T, ties)


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in RECALL_KS}
    out[f"{prefix}_medr"] = float(np.floor(np.median(ranks)) + 1)
    out[f"{prefix}_meanr"] = float(np.mean(ranks) + 1)
    return out


def _as_arrays(sims: np.ndarray | torch.Tensor, image_of_caption: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    sims_np = sims.detach().float().cpu().numpy() if isinstance(sims, torch.Tensor) else np.asarray(sims, dtype=np.float64)
    img = image_of_caption.cpu().numpy() if isinstance(image_of_caption, torch.Tensor) else np.asarray(image_of_caption)
    img = img.astype(np.int64)
    _check_inputs(sims_np, img)
    return sims_np, img


def _metrics_of_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    metrics = {**_rank_summary(i2t, "i2t"), **_rank_summary(t2i, "t2i")}
    recalls = [metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS]
    metrics["rsum"] = float(sum(recalls))
    metrics["mR"] = metrics["rsum"] / len(recalls)
    return {key: metrics[key] for key in METRIC_KEYS}


def recall_metrics(sims: np.ndarray | torch.Tensor, image_of_caption: np.ndarray | torch.Tensor,
                   ties: str = "strict") -> dict[str, float]:
    """All retrieval metrics of a similarity matrix.

    Args:
        sims: (n_images, n_captions) scores, higher = more similar.
        image_of_caption: (n_captions,) image index of each caption.
        ties: ``"strict"`` (a tie ranks the true item last, the default) or ``"reference"`` (the
            reference code's argsort order); see the module docstring.

    Returns:
        dict with ``i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10, mR, rsum, i2t_medr,
        i2t_meanr, t2i_medr, t2i_meanr`` (recalls in percent).
    """
    sims_np, img = _as_arrays(sims, image_of_caption)
    return _metrics_of_ranks(i2t_ranks(sims_np, img, ties), t2i_ranks(sims_np, img, ties))


def distinct_text_metrics(sims: np.ndarray | torch.Tensor, image_of_caption: np.ndarray | torch.Tensor,
                          text_of_caption: np.ndarray | torch.Tensor) -> dict[str, float]:
    """Metrics of the distinct-text view: an item with the same text as a true one counts as found.

    For datasets whose captions repeat (several images share a sentence), no model can tell such
    images apart from the text, so the standard t2i rank of a repeated caption is partly luck of
    the tie rule. Here the queries are the distinct texts (each once): a text query is found at
    rank r when r wrong images (images none of whose captions have that text) score at least as
    high as its best image with that text; an image query is found at rank r when r captions whose
    text is none of its own captions' texts score at least as high as its best such caption. Ties
    are strict, as in :func:`recall_metrics`. An extra table, never the headline number.

    Args:
        text_of_caption: (n_captions,) id of each caption's text; equal ids mean identical text.
    """
    sims_np, img = _as_arrays(sims, image_of_caption)
    texts = (text_of_caption.cpu().numpy() if isinstance(text_of_caption, torch.Tensor)
             else np.asarray(text_of_caption)).astype(np.int64)
    if texts.shape != img.shape:
        raise ValueError(f"text_of_caption has shape {texts.shape}, expected {img.shape}")
    distinct, text_index = np.unique(texts, return_inverse=True)
    image_has_text = np.zeros((sims_np.shape[0], len(distinct)), dtype=bool)
    image_has_text[img, text_index] = True
    # t2i: one query per distinct text; its scores are those of any caption with that text
    first_caption = np.unique(text_index, return_index=True)[1]
    t2i = _positive_ranks(sims_np[:, first_caption].T, image_has_text.T, "strict")
    # i2t: captions whose text is one of the image's texts are positives
    i2t = _positive_ranks(sims_np, image_has_text[:, text_index], "strict")
    return _metrics_of_ranks(i2t, t2i)


def chance_metrics(n_images: int, image_of_caption: np.ndarray) -> dict[str, float]:
    """Expected recalls of a random ranking, for printing beside results.

    t2i: one true image among ``n_images`` → R@K = K / n_images. i2t: an image with c true captions
    among n captions is found in the top K with probability 1 - C(n-c, K) / C(n, K).
    """
    counts = np.bincount(np.asarray(image_of_caption, dtype=np.int64), minlength=n_images)
    n = len(image_of_caption)
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * min(k, n_images) / n_images
        miss = np.ones(n_images)
        for step in range(min(k, n)):
            miss *= np.clip((n - counts - step) / (n - step), 0.0, 1.0)
        out[f"i2t_r{k}"] = 100.0 * float(np.mean(1.0 - miss))
    recalls = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS]
    out["rsum"] = float(sum(recalls))
    out["mR"] = out["rsum"] / len(recalls)
    return out


def class_oracle_metrics(image_classes: Sequence[object], image_of_caption: np.ndarray) -> dict[str, float]:
    """Expected recalls of a model that knows every item's scene class and nothing more.

    A reference row, not a model: it ranks everything of the query's class above everything
    else, in random order within the class. It shows how much of a benchmark coarse scene
    recognition alone explains (on UCM-Captions most captions of a class are near-paraphrases),
    and so how far a retrieval model has to see past the class. Per query, as in
    :func:`chance_metrics` but within the class: t2i R@K = min(K, n) / n for a class of n images;
    i2t R@K = 1 - C(N - c, K) / C(N, K) for an image with c of its class's N captions.

    Args:
        image_classes: class of each image (any hashable labels).
        image_of_caption: (n_captions,) image index of each caption.
    """
    classes = np.unique(np.asarray([str(c) for c in image_classes]), return_inverse=True)[1]
    image_of_caption = np.asarray(image_of_caption, dtype=np.int64)
    counts = np.bincount(image_of_caption, minlength=len(classes))  # captions per image
    images_in_class = np.bincount(classes)[classes]  # per image: images of its class
    captions_in_class = np.bincount(classes, weights=counts)[classes]  # per image: captions of its class
    out: dict[str, float] = {}
    for k in RECALL_KS:
        out[f"t2i_r{k}"] = 100.0 * float(np.mean(np.minimum(k, images_in_class[image_of_caption])
                                                 / images_in_class[image_of_caption]))
        miss = np.ones(len(classes))
        for step in range(k):
            remaining = captions_in_class - step
            ratio = np.divide(remaining - counts, remaining, out=np.zeros_like(remaining), where=remaining > 0)
            miss *= np.clip(ratio, 0.0, 1.0)
        out[f"i2t_r{k}"] = 100.0 * float(np.mean(1.0 - miss))
    recalls = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in RECALL_KS]
    out["rsum"] = float(sum(recalls))
    out["mR"] = out["rsum"] / len(recalls)
    return out


def blockwise_similarity(
    score_block: Callable[[slice, slice], torch.Tensor],
    n_images: int,
    n_captions: int,
    image_block: int,
    caption_block: int,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Assemble the full (n_images, n_captions) matrix from blocks.

    ``score_block(image_slice, caption_slice)`` returns the block of scores. Because every block is
    computed from the same per-item encodings, the result does not depend on the block sizes (up to
    floating-point summation order inside the scorer).
    """
    sims = torch.empty(n_images, n_captions, dtype=torch.float32)
    for i0 in range(0, n_images, image_block):
        rows = slice(i0, min(i0 + image_block, n_images))
        for c0 in range(0, n_captions, caption_block):
            cols = slice(c0, min(c0 + caption_block, n_captions))
            sims[rows, cols] = score_block(rows, cols).float()
            if progress is not None:
                progress((rows.stop - rows.start) * (cols.stop - cols.start))
    return sims


TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mR", "rsum", "i2t_medr", "t2i_medr")


def format_rows(rows: Sequence[tuple[str, dict[str, float]]], title: str = "") -> str:
    """A Markdown table laid out like DOVE's Table I (i2t R@1/5/10, t2i R@1/5/10, mR) plus ranks, one row per (name, metrics)."""
    head = "| | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | mR | R@sum | i2t MedR | t2i MedR |"
    sep = "|" + "---|" * 11
    def row(name: str, m: dict[str, float]) -> str:
        vals = [m.get(k) for k in TABLE_KEYS]
        cells = ["—" if v is None else f"{v:.2f}" for v in vals]
        return f"| {name} | " + " | ".join(cells) + " |"
    return "\n".join(([f"**{title}**", ""] if title else []) + [head, sep] + [row(name, m) for name, m in rows])


def format_table(metrics: dict[str, float], chance: dict[str, float] | None = None, title: str = "") -> str:
    """:func:`format_rows` of one model, with the chance level below it."""
    return format_rows([("model", metrics)] + ([] if chance is None else [("chance", chance)]), title=title)


#: Fixed scoring block (images × captions). It bounds memory only; it is deliberately not tied to
#: any batch size so that the assembled matrix is the same however the caller batches.
SCORE_IMAGE_BLOCK = 128
SCORE_CAPTION_BLOCK = 4096
#: Items per encoding call at evaluation. Fixed, so an item's encoding (whose last bits depend on
#: the shape of the products it goes through) is the same in every evaluation of the same inputs.
ENCODE_CHUNK = 64


@torch.no_grad()
def encode_image_chunks(model: RetrievalModel, image_features: dict[str, torch.Tensor],
                        precision: str = "fp32") -> Encoding:
    """Image encodings of every row of ``image_features``, :data:`ENCODE_CHUNK` rows at a time."""
    model.eval()
    device = module_device(model)
    n_images = next(iter(image_features.values())).shape[0]
    with autocast(precision, device):
        return concat_encodings([model.encode_image(to_device(take_rows(image_features, slice(i, i + ENCODE_CHUNK)), device))
                                 for i in range(0, n_images, ENCODE_CHUNK)])


@torch.no_grad()
def encode_text_chunks(model: RetrievalModel, tokens: torch.Tensor, lengths: torch.Tensor,
                       text_extras: dict[str, torch.Tensor] | None = None, precision: str = "fp32") -> Encoding:
    """Caption encodings, :data:`ENCODE_CHUNK` captions at a time, each chunk cut to its longest caption."""
    model.eval()
    device = module_device(model)
    parts = []
    with autocast(precision, device):
        for c in range(0, tokens.shape[0], ENCODE_CHUNK):
            chunk_lengths = lengths[c : c + ENCODE_CHUNK]
            extras = to_device({name: value[c : c + ENCODE_CHUNK] for name, value in (text_extras or {}).items()}, device)
            parts.append(model.encode_text(tokens[c : c + ENCODE_CHUNK, : int(chunk_lengths.max())].to(device),
                                           chunk_lengths.to(device), **extras))
    return concat_encodings(parts)


def encoding_rows(encoding: Encoding) -> int:
    """How many items an encoding holds (all its tensors share the first dimension)."""
    return int(next(iter(encoding.values())).shape[0])


@torch.no_grad()
def score_encodings(model: RetrievalModel, images: Encoding, texts: Encoding, precision: str = "fp32",
                    progress: bool = False) -> torch.Tensor:
    """The (n_images, n_texts) float32 score matrix of two encodings, block by fixed-size block."""
    model.eval()
    n_images, n_texts = encoding_rows(images), encoding_rows(texts)
    with autocast(precision, module_device(model)), progress_bar(total=n_images * n_texts, desc="scoring pairs", unit="pair",
                                           unit_scale=True, enabled=progress) as bar:
        return blockwise_similarity(
            lambda rows, cols: model.similarity(take_rows(images, rows), take_rows(texts, cols)),
            n_images, n_texts, SCORE_IMAGE_BLOCK, SCORE_CAPTION_BLOCK, progress=bar.update,
        )


def compute_similarity(
    model: RetrievalModel,
    image_features: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    progress: bool = True,
    text_extras: dict[str, torch.Tensor] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """Score every image against every caption: (n_images, n_captions), float32.

    Each image and each distinct caption input (:func:`distinct_rows`) is encoded once, in fixed
    chunks (encodings depend on one item only), then the pairs are scored block by block, and
    every caption gets the scores of its input, so captions with equal text tie exactly. Nothing
    here looks at which caption belongs to which image. ``text_extras`` are the model's extra text
    inputs (e.g. keyword tokens), row-aligned with ``tokens``. ``precision="bf16"`` runs encoding
    and scoring under reduced-precision autocast on the model's device (:mod:`rsitr.precision`);
    inputs move to the model's device chunk by chunk, and the scores are returned as a CPU float32
    matrix either way.
    """
    first, inverse = distinct_rows(tokens, lengths, text_extras)
    extras = {name: value[first] for name, value in (text_extras or {}).items()}
    images = encode_image_chunks(model, image_features, precision)
    texts = encode_text_chunks(model, tokens[first], lengths[first], extras, precision)
    return score_encodings(model, images, texts, precision, progress)[:, inverse]


def evaluate_features(model: RetrievalModel, image_features: dict[str, torch.Tensor], data: SplitData,
                      precision: str = "fp32", progress: bool = True) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics and score matrix of one split, given the features of its images (rows = ``data.image_ids``)."""
    sims = compute_similarity(model, image_features, data.tokens, data.lengths, progress=progress,
                              text_extras=data.extras, precision=precision)
    return recall_metrics(sims, data.caption_local_image), sims


def extra_views(sims: torch.Tensor | np.ndarray, data: SplitData) -> dict[str, dict[str, float]]:
    """The two views reported beside the headline: the reference code's tie order and distinct texts."""
    return {"reference_ties": recall_metrics(sims, data.caption_local_image, ties="reference"),
            "distinct_text": distinct_text_metrics(sims, data.caption_local_image, data.text_ids)}
