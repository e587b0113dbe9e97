"""The one interface every retrieval model implements.

Two kinds of model exist in this field and both fit it:

* **separable** models (VSE++, DOVE without IGA) embed an image and a caption independently;
  ``similarity`` is the cosine matrix of the two embeddings;
* **pairwise** models (DOVE, SCAN, AMFMN, DSAN, ACF) compute the score of an (image, caption) pair
  from both sides; ``similarity`` scores every pair of an image chunk and a caption chunk.

In both cases ``encode_image`` and ``encode_text`` depend on one item only (no batch statistics),
and ``similarity`` of a pair depends on that pair only, so evaluation can encode each side once
and score the full matrix in blocks of any size with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rsitr.losses import same_image_mask, shared_text_mask

Encoding = dict[str, torch.Tensor]


@dataclass
class TrainingCorpus:
    """What :meth:`RetrievalModel.prepare_training` may read before training starts.

    Attributes:
        captions: raw text of every caption of the dataset (index = dataset caption id).
        caption_image: dataset image id of every caption.
        train_caption_ids: caption ids of the training split (the only ones a model may fit on).
        vocab: the run's :class:`rsitr.text.Vocabulary`.
    """

    captions: list[str]
    caption_image: np.ndarray
    train_caption_ids: np.ndarray
    vocab: Any


def take_rows(encoding: Encoding, index: slice | torch.Tensor) -> Encoding:
    """Rows ``index`` of every tensor of an encoding (all share the first dimension)."""
    return {key: value[index] for key, value in encoding.items()}


def concat_encodings(parts: list[Encoding]) -> Encoding:
    """Concatenate encodings of consecutive chunks along the first dimension.

    Word-level encodings may have a different width per chunk: a chunk's word tensor (n, L, ...)
    is only as wide as that chunk's longest caption. Tensors of a key with at least two dimensions
    that differ only in dimension 1 are therefore zero-padded along it to the widest part before
    concatenation (False for bool tensors). The width of a joined word tensor thus says nothing
    about any caption's length: models must take caption lengths from their own ``lengths`` entry
    (or masks derived from it), never from the width. Any other shape mismatch is a ValueError.
    """
    return {key: _concat_key(key, [p[key] for p in parts]) for key in parts[0]}


def _concat_key(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of one key's tensors, zero-padding dimension 1 to the largest size when needed."""
    shapes = [tuple(t.shape) for t in tensors]
    first = shapes[0]
    if all(shape == first for shape in shapes) or (len(first) == 1 and all(len(s) == 1 for s in shapes)):
        return torch.cat(tensors)
    if len(first) < 2 or any(len(s) != len(first) or s[2:] != first[2:] for s in shapes):
        raise ValueError(f"cannot concatenate encodings of key {key!r}: shapes {shapes} may differ only in "
                         "dimension 0 and, for tensors of two or more dimensions, dimension 1")
    width = max(s[1] for s in shapes)
    return torch.cat([_pad_dim1(t, width) for t in tensors])


def _pad_dim1(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` with dimension 1 zero-padded at the end to ``width``."""
    if tensor.shape[1] == width:
        return tensor
    out = tensor.new_zeros((tensor.shape[0], width, *tensor.shape[2:]))
    out[:, : tensor.shape[1]] = tensor
    return out


class RetrievalModel(nn.Module):
    """Base class: subclasses set ``architecture``, ``image_inputs`` and implement the four methods."""

    architecture: ClassVar[str] = ""
    #: keys of the cached image features the model reads (see ``rsitr.features``).
    image_inputs: ClassVar[tuple[str, ...]] = ()
    #: extra per-caption text inputs besides the sentence tokens; ``"keywords"`` makes the
    #: pipeline pass ``keyword_tokens`` (n, K) and ``keyword_lengths`` (n,) to ``encode_text``
    #: and ``training_loss`` (see ``rsitr.text.keyword_inputs``).
    text_inputs: ClassVar[tuple[str, ...]] = ()
    #: keys ``(image_key, text_key)`` of a separable pair of embeddings in the encodings, whose
    #: cosine ranks candidates without the full (pairwise) score: a first retrieval stage that a
    #: vector index can serve. None when the model has no such pair.
    first_stage: ClassVar[tuple[str, str] | None] = None
    #: keys ``(image_key, text_key)`` of :meth:`pair_embeddings` whose cosine is the model's final
    #: pair score (the "final visual and textual embeddings" DOVE's Fig. 10 plots); None when the
    #: model does not implement :meth:`pair_embeddings`.
    final_pair: ClassVar[tuple[str, str] | None] = None
    #: key of the image embedding an auxiliary scene classifier may supervise during training
    #: (``train.scene_loss``, :mod:`rsitr_train.auxiliary`): a (n, d) vector per image; None = none.
    scene_embedding: ClassVar[str | None] = None
    #: (image_texts, caption_texts) of :meth:`mask_identical_captions`; None: the papers' negatives.
    _identical_texts: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def pairwise(self) -> bool:
        """Whether a caption's final embedding depends on the candidate image."""
        return False

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        raise NotImplementedError

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Encoding:
        """Encode captions; ``extras`` holds the inputs named by ``text_inputs`` (row-aligned with tokens)."""
        raise NotImplementedError

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """(n_images, n_texts) scores of every image of ``images`` against every text of ``texts``."""
        raise NotImplementedError

    def pair_embeddings(self, images: Encoding, texts: Encoding) -> dict[str, torch.Tensor]:
        """Named intermediate embeddings of ALIGNED pairs: row k of ``images`` with row k of ``texts``.

        For analyses of the embedding space (DOVE Sec. IV-F, Figs. 9–10): every returned tensor has
        one row per pair, (n, d), under the model's own name for it (DOVE: ``V_M``, ``V_R``,
        ``V_MR``, ``T_G``, ``T_RG``); :attr:`final_pair` names the two whose cosine is the final
        score, so ``cos(out[final_pair[0]][k], out[final_pair[1]][k])`` is the final score of pair k.
        Only the n given pairs are computed, never the n × n matrix, so a pairwise model's
        candidate-dependent text embedding is affordable for every positive pair of a split.

        Raises:
            NotImplementedError: the model does not name its intermediate embeddings (the default);
                the message names the architecture.
        """
        raise NotImplementedError(f"model {self.architecture or type(self).__name__!r} does not expose named pair embeddings")

    def training_loss(
        self,
        features: dict[str, torch.Tensor],
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        image_ids: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        **extras: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Named loss terms of a batch of B (image, caption) pairs; ``"loss"`` is the total.

        ``image_ids`` and ``caption_ids`` are dataset ids (captions of one image are positives of
        each other, never negatives); ``extras`` are the ``text_inputs`` of the batch's captions.

        The default encodes both sides and hands the encodings to :meth:`encoding_loss`; that
        split is what lets distributed training (:mod:`rsitr.distributed`) encode each process's
        share of a batch, gather the encodings, and compute the loss over the whole batch.
        """
        return self.encoding_loss(self.encode_image(features), self.encode_text(tokens, lengths, **extras),
                                  image_ids, caption_ids)

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms of B pairs from their encodings (row k of ``images`` pairs with row k of ``texts``).

        Encodings depend on one item only, so the encodings of a batch may be computed in parts
        (by several processes) and joined (:func:`concat_encodings`) before this is called.
        """
        raise NotImplementedError

    def mask_identical_captions(self, image_texts: torch.Tensor | None, caption_texts: torch.Tensor | None) -> None:
        """Exclude word-for-word copies of an anchor's captions from the negatives of every training loss.

        ``image_texts``: (n_dataset_images, K) text ids of each image's captions, ``-1`` padded;
        ``caption_texts``: (n_dataset_captions,) text id of each caption, ``-1`` for captions
        outside the training split (:func:`rsitr.losses.shared_text_mask`). ``None`` restores the
        papers' rule (only captions of the same image are excluded). Training-time state only:
        nothing of it is saved or read at evaluation.
        """
        self._identical_texts = None if image_texts is None or caption_texts is None else (image_texts, caption_texts)

    def non_negatives(self, image_ids: torch.Tensor, caption_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, B) pairs of a batch that no triplet loss may treat as negatives.

        Always the pairs of the same image; under :meth:`mask_identical_captions` also every
        (image i, caption j) where caption j repeats one of image i's captions word for word.
        """
        same = same_image_mask(image_ids)
        identical = self._identical_texts
        if identical is None or caption_ids is None:
            return same
        image_texts, caption_texts = (t.to(image_ids.device) for t in identical)
        return same | shared_text_mask(image_texts[image_ids], caption_texts[caption_ids.to(image_ids.device)])

    def prepare_training(self, corpus: TrainingCorpus) -> None:
        """Fit anything derived from the training text before the first step (default: nothing).

        Called by the trainer on every start, resumed runs included; what it computes must not
        be needed at evaluation unless it is stored in a buffer.
        """

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
