"""Prior text similarity S(T, T_I) for AMFMN's dynamic margin (Eq. 29): BLEU and a METEOR substitute.

AMFMN turns the similarity between a caption T and the captions T_I of an image I into the margin of
that (image, caption) pair: the more T reads like what annotators wrote for I, the smaller the
margin, so near-duplicate captions of other images stop being pushed away as hard negatives. The
paper computes S with BLEU and METEOR but gives neither weights nor settings; this module fixes them.

Metrics (tokens from :func:`rsitr.text.tokenize`, i.e. lower case, punctuation dropped):

* **BLEU** (Papineni et al.): clipped n-gram precision p_n for n = 1..4 against the reference set
  (each candidate n-gram counts at most as often as it occurs in the reference holding it most
  often), geometric mean with uniform weights, times the brevity penalty ``exp(1 - r/c)`` when the
  candidate length c does not exceed the reference length r closest to c (ties go to the shorter
  reference). Orders the candidate is too short to have are left out and the weights spread over
  the others, so a three-word caption identical to a reference scores 1. ``smooth=True`` adds one
  to the matched and total counts of the orders n >= 2 (the "BLEU+1" sentence-level smoothing of
  Lin and Och): unsmoothed BLEU-4 is zero for every pair without a shared 4-gram, which is nearly
  every negative pair, and would leave the margin no graded signal.
* **METEOR** (Banerjee and Lavie; standard parameters): unigram matches m from an exact stage and a
  stem stage, P = m/|hypothesis|, R = m/|reference|, ``Fmean = 10PR / (R + 9P)``, fragmentation
  penalty ``0.5 (chunks/m)^3``, score ``Fmean (1 - penalty)``, maximum over the references. This is
  a substitute for the full metric: there is no synonym (WordNet) or paraphrase stage, the stem
  stage uses the small suffix stripper :func:`stem` instead of the Porter stemmer, and chunks are
  counted from adjacent matches (see :func:`meteor`).

The prior is ``S = bleu_weight * BLEU + (1 - bleu_weight) * METEOR`` with ``bleu_weight = 0.5``:
the paper calls S "the weighted sum" of the two without weights, and equal weights keep S in
[0, 1] with both views (n-gram overlap, aligned-word F-score) counting alike.

Speed. Training needs S for every (caption, image) pair of a batch (about 100 × 100) at every step,
over corpora of up to 40k captions. :class:`PriorSimilarity` therefore tokenises the training
captions once, gives every word n-gram, stem and stem bigram an integer id, and stores per caption
its (id, count) lists and per image the maximal count of each n-gram over its captions (BLEU's
clipping table). A batch block then lays the references out as a dense table over the n-grams
present in the batch's captions, and every caption entry adds ``min(count, table)`` to its row:
a gather and a segment sum (:func:`clipped_matches`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from rsitr.text import tokenize

BLEU_ORDERS = 4
#: METEOR's standard parameterisation: Fmean = P R / (ALPHA P + (1 - ALPHA) R) = 10PR / (R + 9P)
#: with ALPHA = 0.9, penalty = GAMMA (chunks / matches) ** BETA.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA = 0.9, 3.0, 0.5

# Suffix rules of the stem stage, tried in order; the first suffix that matches decides and is
# applied only if at least MIN_STEM letters remain (and, for verb endings, a vowel remains).
_PLURAL_RULES = (("sses", "ss"), ("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("xes", "x"), ("s", ""))
_PLURAL_KEEP = ("ss", "us", "is")
_VERB_RULES = (("ing", ""), ("ed", ""))
_VOWELS = frozenset("aeiouy")
MIN_STEM = 3


def _strip(word: str, rules: tuple[tuple[str, str], ...], need_vowel: bool) -> str:
    for suffix, replacement in rules:
        if word.endswith(suffix):
            base = word[: len(word) - len(suffix)]
            if len(base) < MIN_STEM or (need_vowel and not _VOWELS.intersection(base)):
                return word
            return base + replacement
    return word


def stem(word: str) -> str:
    """A small suffix stripper: plural endings, then ``-ing`` / ``-ed``.

    "buildings" → "build", "parked" and "parking" → "park", "trees" → "tree", "churches" →
    "church"; "grass", "bus", "red" and "ring" stay. It only has to make inflections of one word
    meet in METEOR's stem stage, not to produce dictionary stems.
    """
    if not word.endswith(_PLURAL_KEEP):
        word = _strip(word, _PLURAL_RULES, need_vowel=False)
    return _strip(word, _VERB_RULES, need_vowel=True)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of ``tokens`` in order (empty when there are fewer than n tokens)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def closest_reference_length(candidate_length: int, reference_lengths: Sequence[int]) -> int:
    """BLEU's effective reference length: the closest to the candidate's, the shorter on a tie."""
    return min(reference_lengths, key=lambda r: (abs(r - candidate_length), r))


def brevity_penalty(candidate_length: int, reference_length: int) -> float:
    """1 for a candidate longer than the reference, else ``exp(1 - r/c)`` (0 for an empty candidate)."""
    if candidate_length == 0:
        return 0.0
    if candidate_length > reference_length:
        return 1.0
    return math.exp(1.0 - reference_length / candidate_length)


def bleu(candidate: Sequence[str], references: Sequence[Sequence[str]], smooth: bool = True,
         max_order: int = BLEU_ORDERS) -> float:
    """Sentence BLEU of a tokenised candidate against a set of tokenised references (see module doc)."""
    references = [r for r in references if r]
    if not candidate or not references:
        return 0.0
    log_sum, orders = 0.0, 0
    for n in range(1, max_order + 1):
        total = len(candidate) - n + 1
        if total <= 0:
            continue
        most: Counter = Counter()
        for reference in references:
            for gram, count in Counter(ngrams(reference, n)).items():
                most[gram] = max(most[gram], count)
        matched = sum(min(count, most[gram]) for gram, count in Counter(ngrams(candidate, n)).items())
        precision = (matched + 1) / (total + 1) if smooth and n > 1 else matched / total
        if precision == 0.0:
            return 0.0
        log_sum += math.log(precision)
        orders += 1
    reference_length = closest_reference_length(len(candidate), [len(r) for r in references])
    return brevity_penalty(len(candidate), reference_length) * math.exp(log_sum / orders)


def meteor_components(matches: float, links: float, hyp_length: int, ref_length: int) -> float:
    """METEOR of one (hypothesis, reference) pair from its match and adjacent-match counts.

    ``chunks = max(1, matches - links)``: a run of k aligned words that are adjacent in both
    sentences is one chunk and holds k - 1 adjacent matches.
    """
    if matches <= 0 or hyp_length == 0 or ref_length == 0:
        return 0.0
    precision, recall = matches / hyp_length, matches / ref_length
    fmean = precision * recall / (METEOR_ALPHA * precision + (1 - METEOR_ALPHA) * recall)
    chunks = max(1.0, matches - links)
    return fmean * (1.0 - METEOR_GAMMA * (chunks / matches) ** METEOR_BETA)


def meteor(hypothesis: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """METEOR substitute (exact + stem stages, no synonyms), maximum over the references.

    Matches: exact matching and then stem matching of the words left over is, word class by word
    class, the same as matching stems, so ``m = sum_s min(count_h(s), count_r(s))`` over stems s.
    Chunks: ``m - a`` where a, the adjacent matches, is the clipped count of stem bigrams shared by
    the two sentences. This is the chunk count of the alignment with fewest chunks whenever no stem
    occurs twice in either sentence (the usual case for captions); with repeated stems it can
    count fewer chunks than any real alignment has.
    """
    hyp = [stem(w) for w in hypothesis]
    hyp_stems, hyp_pairs = Counter(hyp), Counter(ngrams(hyp, 2))
    best = 0.0
    for reference in references:
        ref = [stem(w) for w in reference]
        ref_stems, ref_pairs = Counter(ref), Counter(ngrams(ref, 2))
        matches = sum(min(c, ref_stems[s]) for s, c in hyp_stems.items())
        links = sum(min(c, ref_pairs[p]) for p, c in hyp_pairs.items())
        best = max(best, meteor_components(matches, links, len(hyp), len(ref)))
    return best


def prior_similarity(caption: Sequence[str], references: Sequence[Sequence[str]], bleu_weight: float = 0.5,
                     smooth: bool = True) -> float:
    """S(T, T_I) of one tokenised caption against one image's tokenised captions (scalar reference)."""
    return bleu_weight * bleu(caption, references, smooth) + (1 - bleu_weight) * meteor(caption, references)


# ------------------------------------------------------------------------------------- batch version


@dataclass
class _Rows:
    """Row-compressed (id, count) lists: row r holds ``ids[indptr[r]:indptr[r + 1]]`` (ids sorted)."""

    indptr: np.ndarray
    ids: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_pairs(cls, rows: np.ndarray, ids: np.ndarray, n_rows: int, n_ids: int, counts: np.ndarray | None = None,
                   reduce_max: bool = False) -> _Rows:
        """Group (row, id[, count]) entries: counts are summed (occurrences) or, with ``reduce_max``, maxed."""
        keys = rows.astype(np.int64) * max(n_ids, 1) + ids
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        values = np.ones(len(keys), dtype=np.int64) if counts is None else counts[order].astype(np.int64)
        unique, starts = np.unique(keys, return_index=True)
        if len(unique):
            reduced = (np.maximum if reduce_max else np.add).reduceat(values, starts)
        else:
            reduced = np.zeros(0, dtype=np.int64)
        row_of = unique // max(n_ids, 1)
        indptr = np.searchsorted(row_of, np.arange(n_rows + 1)).astype(np.int64)
        return cls(indptr, unique % max(n_ids, 1), reduced.astype(np.float32))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position in ``rows``, id, count) of every entry of the given rows."""
        starts, stops = self.indptr[rows], self.indptr[rows + 1]
        sizes = stops - starts
        position = np.repeat(np.arange(len(rows)), sizes)
        offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        index = np.repeat(starts, sizes) + offsets
        return position, self.ids[index], self.counts[index]


def _column_table(rows: _Rows, which: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(len(columns), len(which)) counts of the given rows, one line per id of the sorted ``columns``."""
    position, ids, counts = rows.gather(which)
    out = np.zeros((len(columns), len(which)), dtype=np.float32)
    if len(columns) == 0 or len(ids) == 0:
        return out
    at = np.minimum(np.searchsorted(columns, ids), len(columns) - 1)
    keep = columns[at] == ids
    out[at[keep], position[keep]] = counts[keep]
    return out


def clipped_matches(candidates: _Rows, rows: np.ndarray, references: _Rows, reference_rows: np.ndarray) -> np.ndarray:
    """``sum_g min(count_i(g), count_j(g))`` for every candidate row i and reference row j.

    Only the ids of the candidates matter, so the references are laid out as a dense table over
    those ids; each candidate entry (i, g, c) then adds ``min(c, table[g])`` to row i: a gather and
    a segment sum, about (candidate entries × references) operations.
    """
    out = np.zeros((len(rows), len(reference_rows)), dtype=np.float32)
    position, ids, counts = candidates.gather(rows)
    if len(ids) == 0 or len(reference_rows) == 0:
        return out
    columns, column_of = np.unique(ids, return_inverse=True)
    table = _column_table(references, reference_rows, columns)
    contributions = np.minimum(table[column_of.reshape(-1)], counts[:, None])
    starts = np.flatnonzero(np.r_[True, position[1:] != position[:-1]])
    out[position[starts]] = np.add.reduceat(contributions, starts, axis=0)
    return out


def _ngram_ids(values: np.ndarray, starts_ok: list[np.ndarray], max_order: int) -> list[np.ndarray]:
    """Integer id of the n-gram starting at every position (-1 where it would cross a caption end).

    ``values`` are the token ids of all captions laid end to end; ``starts_ok[n-1]`` marks the
    positions where an n-gram fits inside its caption. Order n is built from order n - 1 by
    pairing its id with the next token, then renumbering densely, so ids never overflow.
    """
    vocabulary = int(values.max(initial=0)) + 1
    ids = [np.where(starts_ok[0], values, -1)]
    for n in range(2, max_order + 1):
        span = len(values) - n + 1  # positions where an n-gram could start at all
        current = np.full(len(values), -1, dtype=np.int64)
        if span > 0:
            keys = ids[-1][:span] * vocabulary + values[n - 1 :]
            valid = starts_ok[n - 1][:span]
            if valid.any():
                current[np.flatnonzero(valid)] = np.unique(keys[valid], return_inverse=True)[1].reshape(-1)
        ids.append(current)
    return ids


class PriorSimilarity:
    """S(T, T_I) for any (training caption, image) pairs, built once from the training captions.

    Args:
        captions: raw text of every caption of the dataset (index = dataset caption id).
        caption_image: dataset image id of every caption.
        caption_ids: the caption ids to use (the training split); only they are candidates and
            only they are references, so nothing of the validation or test text is seen.
        bleu_weight: weight of BLEU in S; METEOR gets the rest.
        smooth: BLEU+1 smoothing of the orders n >= 2 (see the module doc).

    Calling the object with (caption ids, image ids) returns the (n_captions, n_images) float32
    matrix of S. An image without training captions has S = 0 with every caption (no reference).
    """

    def __init__(self, captions: Sequence[str], caption_image: Sequence[int] | np.ndarray,
                 caption_ids: Sequence[int] | np.ndarray, bleu_weight: float = 0.5, smooth: bool = True) -> None:
        if not 0.0 <= bleu_weight <= 1.0:
            raise ValueError(f"bleu_weight must lie in [0, 1], got {bleu_weight}")
        self.bleu_weight, self.smooth = float(bleu_weight), bool(smooth)
        caption_ids = np.asarray(caption_ids, dtype=np.int64).reshape(-1)
        caption_image = np.asarray(caption_image, dtype=np.int64)
        self._caption_row = np.full(len(captions), -1, dtype=np.int64)
        self._caption_row[caption_ids] = np.arange(len(caption_ids))
        images, row_image = np.unique(caption_image[caption_ids], return_inverse=True)
        self._image_index = np.full(int(caption_image.max(initial=-1)) + 1, -1, dtype=np.int64)
        self._image_index[images] = np.arange(len(images))
        self._n_images = len(images)
        self._build(caption_ids, captions, row_image.astype(np.int64))

    def _build(self, caption_ids: np.ndarray, captions: Sequence[str], row_image: np.ndarray) -> None:
        """Token ids, n-gram / stem tables and per-image reference lists of the training captions."""
        tokens = [tokenize(captions[c]) for c in caption_ids]
        self._lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        n_rows, flat = len(tokens), [w for t in tokens for w in t]
        row = np.repeat(np.arange(n_rows), self._lengths)
        position = np.arange(len(flat)) - np.repeat(np.cumsum(self._lengths) - self._lengths, self._lengths)
        remaining = np.repeat(self._lengths, self._lengths) - position  # tokens left from each position
        fits = [remaining >= n for n in range(1, BLEU_ORDERS + 1)]
        words = _dense_ids(flat)
        stems = _dense_ids([stem(w) for w in flat])
        # BLEU: word n-grams per caption, and their maximal count over each image's captions
        self._grams: list[_Rows] = []
        self._image_max: list[_Rows] = []
        for ids in _ngram_ids(words, fits, BLEU_ORDERS):
            ok = ids >= 0
            n_ids = int(ids.max(initial=-1)) + 1
            per_caption = _Rows.from_pairs(row[ok], ids[ok], n_rows, n_ids)
            self._grams.append(per_caption)
            owner, gram, count = per_caption.gather(np.arange(n_rows))
            self._image_max.append(_Rows.from_pairs(row_image[owner], gram, self._n_images + 1, n_ids, count, reduce_max=True))
        # METEOR: stems and stem bigrams per caption
        self._stem_rows = []
        for ids in _ngram_ids(stems, fits, 2):
            ok = ids >= 0
            self._stem_rows.append(_Rows.from_pairs(row[ok], ids[ok], n_rows, int(ids.max(initial=-1)) + 1))
        # references of each image (row n_images: the empty list of images without training captions)
        order = np.argsort(row_image, kind="stable")
        self._refs = _Rows(np.searchsorted(row_image[order], np.arange(self._n_images + 2)).astype(np.int64),
                           order.astype(np.int64), np.ones(len(order), dtype=np.float32))

    # --------------------------------------------------------------------------------------- lookup

    def caption_rows(self, caption_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Internal rows of training caption ids; any other id raises ValueError."""
        ids = np.asarray(caption_ids, dtype=np.int64).reshape(-1)
        inside = (ids >= 0) & (ids < len(self._caption_row))
        rows = np.where(inside, self._caption_row[np.clip(ids, 0, len(self._caption_row) - 1)], -1)
        if (rows < 0).any():
            raise ValueError(f"caption ids {ids[rows < 0][:5].tolist()} are not training captions of this prior")
        return rows

    def image_rows(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Internal image index; images without training captions map to the empty reference row."""
        ids = np.asarray(image_ids, dtype=np.int64).reshape(-1)
        inside = (ids >= 0) & (ids < len(self._image_index))
        index = np.where(inside, self._image_index[np.clip(ids, 0, max(len(self._image_index) - 1, 0))], -1)
        return np.where(index < 0, self._n_images, index)

    def __call__(self, caption_ids: Sequence[int] | np.ndarray, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n_captions, n_images) prior similarity S of every caption against every image."""
        rows, images = self.caption_rows(caption_ids), self.image_rows(image_ids)
        unique_images, inverse = np.unique(images, return_inverse=True)
        score = (self.bleu_weight * self.bleu_block(rows, unique_images)
                 + (1.0 - self.bleu_weight) * self.meteor_block(rows, unique_images))
        return score[:, inverse]

    def _reference_table(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n_images, R) reference caption rows of each image, padded with -1, and the mask of real ones."""
        position, refs, _ = self._refs.gather(images)
        sizes = np.bincount(position, minlength=len(images))
        width = max(int(sizes.max(initial=0)), 1)
        table = np.full((len(images), width), -1, dtype=np.int64)
        slot = np.arange(len(refs)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        table[position, slot] = refs
        return table, table >= 0

    # ----------------------------------------------------------------------------------------- BLEU

    def bleu_block(self, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(len(rows), len(images)) BLEU of caption rows against the training captions of images."""
        lengths = self._lengths[rows].astype(np.float64)
        log_sum = np.zeros((len(rows), len(images)))
        orders = np.zeros(len(rows))
        zero = np.zeros((len(rows), len(images)), dtype=bool)
        for n in range(1, BLEU_ORDERS + 1):
            total = np.maximum(lengths - n + 1, 0)[:, None]
            matched = clipped_matches(self._grams[n - 1], rows, self._image_max[n - 1], images).astype(np.float64)
            if self.smooth and n > 1:
                precision = (matched + 1) / (total + 1)
            else:
                precision = np.divide(matched, total, out=np.zeros_like(matched), where=total > 0)
            used = total > 0
            zero |= used & (precision <= 0)
            log_sum += np.where(used, np.log(np.where(precision > 0, precision, 1.0)), 0.0)
            orders += used[:, 0]
        score = np.exp(log_sum / np.maximum(orders, 1)[:, None])
        score[zero | (orders == 0)[:, None]] = 0.0
        return (score * self._brevity(lengths, images)).astype(np.float32)

    def _brevity(self, lengths: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Brevity penalty of every (caption, image) pair against the image's closest reference length."""
        table, real = self._reference_table(images)
        ref_len = np.where(real, self._lengths[np.maximum(table, 0)], 0).astype(np.float64)  # (M, R)
        gap = np.abs(ref_len[None] - lengths[:, None, None])
        key = np.where(real[None], 2 * gap + (ref_len[None] > lengths[:, None, None]), np.inf)
        closest = np.take_along_axis(np.broadcast_to(ref_len[None], key.shape), key.argmin(-1)[..., None], -1)[..., 0]
        c = lengths[:, None]
        penalty = np.where(c > closest, 1.0, np.exp(1.0 - closest / np.maximum(c, 1)))
        return np.where((c > 0) & cast(np.ndarray, real.any(-1))[None], penalty, 0.0)

    # --------------------------------------------------------------------------------------- METEOR

    def meteor_block(self, rows: np.ndarray, images: np.ndarray) -> np.ndarray:
        """(len(rows), len(images)) METEOR substitute, maximum over each image's training captions."""
        table, real = self._reference_table(images)
        refs = table[real]  # all references of the block, image by image
        # stems give the matches, stem bigrams the adjacent matches
        matches, links = (clipped_matches(kind, rows, kind, refs).astype(np.float64) for kind in self._stem_rows)
        hyp = self._lengths[rows].astype(np.float64)[:, None]
        ref = self._lengths[refs].astype(np.float64)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision, recall = matches / hyp, matches / ref
            fmean = precision * recall / (METEOR_ALPHA * precision + (1 - METEOR_ALPHA) * recall)
            chunks = np.maximum(matches - links, 1.0)
            score = fmean * (1.0 - METEOR_GAMMA * (chunks / matches) ** METEOR_BETA)
        score = np.where(matches > 0, score, 0.0)
        per_image = np.zeros((len(rows), *table.shape))
        per_image[:, real] = score
        return per_image.max(axis=-1).astype(np.float32)


def _dense_ids(items: list[str]) -> np.ndarray:
    """Dense integer ids of strings (first-seen order)."""
    index: dict[str, int] = {}
    return np.fromiter((index.setdefault(w, len(index)) for w in items), dtype=np.int64, count=len(items))
