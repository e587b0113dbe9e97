"""Text processing: a download-free tokenizer, vocabularies, and optional GloVe vectors.

The vocabulary file is the AMFMN json layout (``word2idx``, ``idx2word``, ``idx``) so that a user's
AMFMN/GaLR vocabulary loads unchanged: indices start at 1 (0 is padding) and the last index is
``<unk>``, which every out-of-vocabulary word maps to.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from rsitr.errors import ConfigError, DatasetError
from rsitr.io import write_json

PAD_INDEX = 0
UNK_TOKEN = "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens; punctuation is dropped, digits kept ("2 planes" → ["2", "planes"])."""
    return _WORD.findall(text.lower())


class Vocabulary:
    """Word ↔ index map with 0 reserved for padding and ``<unk>`` as the last index."""

    def __init__(self, words: Sequence[str]) -> None:
        unique = [w for w in dict.fromkeys(words) if w != UNK_TOKEN]
        self.idx2word = [""] + unique + [UNK_TOKEN]  # position 0 is padding
        self.word2idx = {w: i for i, w in enumerate(self.idx2word) if i > 0}
        self.unk_index = self.word2idx[UNK_TOKEN]

    def __len__(self) -> int:
        """Number of embedding rows needed (padding row included)."""
        return len(self.idx2word)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    def encode(self, text: str) -> list[int]:
        """Indices of the tokens of ``text``; unknown words become ``<unk>``."""
        return [self.word2idx.get(tok, self.unk_index) for tok in tokenize(text)]

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.idx2word[i] for i in indices if i != PAD_INDEX]

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Vocabulary of the words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for text in texts for tok in tokenize(text))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def to_json(self) -> dict:
        """The AMFMN vocabulary layout."""
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word) if i > 0},
            "idx": len(self.idx2word),
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read an AMFMN-style vocabulary json (``word2idx`` required; indices must be 1..n)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            word2idx = data["word2idx"]
        except FileNotFoundError as exc:
            raise DatasetError(path, "vocabulary file not found") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(path, "not a vocabulary json (needs a 'word2idx' object)") from exc
        ordered = sorted(word2idx.items(), key=lambda kv: int(kv[1]))
        expected = list(range(1, len(ordered) + 1))
        if [int(i) for _, i in ordered] != expected:
            raise DatasetError(path, "vocabulary indices must run 1..n without gaps (0 is padding)")
        return cls([w for w, _ in ordered])


def encode_batch(vocab: Vocabulary, texts: Sequence[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of texts into ``(tokens (B, L) int64, lengths (B,) int64)``.

    Empty captions (no token at all) encode as a single ``<unk>`` so that recurrent encoders always
    see at least one step; readers reject empty captions before this point.
    """
    encoded = [vocab.encode(t)[:max_length] if max_length else vocab.encode(t) for t in texts]
    encoded = [e if e else [vocab.unk_index] for e in encoded]
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.int64)
    tokens = torch.full((len(encoded), int(lengths.max()) if encoded else 1), PAD_INDEX, dtype=torch.int64)
    for row, seq in enumerate(encoded):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return tokens, lengths


#: Function words dropped when keywords are taken from a sentence (AMFMN, Sec. IV-B: "we filter
#: the keywords in sentence"): articles, auxiliaries, pronouns, conjunctions and prepositions, so
#: that what remains are the content words (objects, attributes, counts) a keyword list holds.
STOP_WORDS = frozenset(["a", "an", "the", "this", "that", "these", "those", "there", "here", "it", "its", "they", "them", "their", "some", "any", "each", "every", "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "do", "does", "did", "can", "could", "will", "would", "may", "might", "shall", "should", "and", "or", "but", "nor", "so", "as", "than", "then", "also", "very", "too", "not", "no", "of", "in", "on", "at", "to", "from", "by", "with", "without", "for", "into", "onto", "over", "under", "above", "below", "near", "nearby", "beside", "besides", "next", "between", "among", "around", "along", "across", "behind", "through", "inside", "outside", "up", "down", "off", "out", "about", "against", "toward", "towards", "while", "where", "which", "who", "whom", "whose", "what", "when", "how"])


def sentence_keywords(text: str) -> list[str]:
    """The content words of a sentence in order of first appearance (stop words and repeats removed)."""
    seen: dict[str, None] = {}
    for word in tokenize(text):
        if word not in STOP_WORDS:
            seen.setdefault(word)
    return list(seen)


def keyword_inputs(
    vocab: Vocabulary,
    captions: Sequence[str],
    keywords: Sequence[Sequence[str]] | None = None,
    max_length: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keyword tokens of each caption, padded: ``(tokens (n, K), lengths (n,))``.

    A caption's keywords are its dataset keywords when the dataset has them (RSITMD gives each
    image 1–5 phrases such as "green trees"; all their words are used, in order) and otherwise the
    content words of the caption itself (:func:`sentence_keywords`). An empty list falls back to
    the sentence's words, so every caption has at least one keyword token.
    """
    texts = []
    for index, caption in enumerate(captions):
        given = list(keywords[index]) if keywords is not None else []
        words = [w for phrase in given for w in tokenize(phrase) if w not in STOP_WORDS] if given else []
        texts.append(" ".join(words or sentence_keywords(caption) or tokenize(caption)))
    return encode_batch(vocab, texts, max_length)


def text_inputs(vocab: Vocabulary, captions: Sequence[str], names: Sequence[str],
                keywords: Sequence[Sequence[str]] | None = None) -> dict[str, torch.Tensor]:
    """The extra text inputs a model declares (``RetrievalModel.text_inputs``) for these captions.

    ``"keywords"`` gives ``keyword_tokens`` and ``keyword_lengths`` (:func:`keyword_inputs`); with
    ``keywords=None`` they come from each caption's own words, as for any free-text query.
    """
    extras: dict[str, torch.Tensor] = {}
    for name in names:
        if name != "keywords":
            raise ConfigError(f"unknown text input {name!r} (known: keywords)")
        extras["keyword_tokens"], extras["keyword_lengths"] = keyword_inputs(vocab, captions, keywords)
    return extras


def load_glove(path: str | Path, vocab: Vocabulary, dim: int) -> tuple[torch.Tensor, int]:
    """Embedding matrix (len(vocab), dim) from a GloVe text file; returns it and the number of words found.

    Words absent from the file keep a small random vector (seeded by the caller's RNG state); the
    padding row is zero. A line whose vector length differs from ``dim`` raises a one-line error.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(path, "GloVe file not found")
    weights = torch.randn(len(vocab), dim) * 0.1
    weights[PAD_INDEX] = 0.0
    found = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            word, _, rest = line.rstrip("\n").partition(" ")
            index = vocab.word2idx.get(word)
            if index is None:
                continue
            values = np.array(rest.split(), dtype=np.float32)
            if values.shape != (dim,):
                raise DatasetError(path, f"line {line_no}: vector of length {values.size}, expected {dim}")
            weights[index] = torch.from_numpy(values)
            found += 1
    return weights, found


def distinct_rows(tokens: torch.Tensor, lengths: torch.Tensor,
                  text_extras: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which captions are the same model input: (first row of each distinct input, inverse map).

    Two captions are the same input when their lengths, their tokens up to the length and every
    extra text input agree. ``first`` lists, in order of first appearance, one row per distinct
    input; ``inverse[c]`` is the position in ``first`` of caption ``c``'s input.
    """
    n = tokens.shape[0]
    columns = [lengths.reshape(n, 1).long(), tokens.long() * (torch.arange(tokens.shape[1]) < lengths.reshape(n, 1))]
    for name in sorted(text_extras or {}):
        columns.append((text_extras or {})[name].reshape(n, -1).long())
    rows = torch.cat(columns, dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if n else 0,), n, dtype=torch.int64)
    first = first.scatter_reduce(0, inverse, torch.arange(n), reduce="amin")  # first row of each group
    order = torch.argsort(first)  # groups in order of first appearance
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return first[order], position[inverse]
