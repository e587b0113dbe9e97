"""The captions of one split as model inputs: token tensors, lengths and the ids that pair them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rsitr.data.dataset import RetrievalDataset
from rsitr.text import Vocabulary, distinct_rows, encode_batch, text_inputs


@dataclass
class SplitData:
    """Captions of one split as token tensors, with the (full-dataset) image id of each."""

    image_ids: torch.Tensor  # (n_images,) full-dataset ids of the split's images
    tokens: torch.Tensor  # (n_captions, L)
    lengths: torch.Tensor  # (n_captions,)
    caption_image: torch.Tensor  # (n_captions,) full-dataset image id of each caption
    caption_local_image: np.ndarray  # (n_captions,) index into image_ids of each caption
    caption_ids: torch.Tensor  # (n_captions,) full-dataset caption id of each caption
    extras: dict[str, torch.Tensor]  # the model's text_inputs, row-aligned with tokens (e.g. keyword_tokens)
    text_ids: torch.Tensor  # (n_captions,) equal ids = the same token sequence (the distinct-text view)


def text_extras(dataset: RetrievalDataset, caption_ids: list[int], vocab: Vocabulary,
                names: Sequence[str], dataset_keywords: bool = False) -> dict[str, torch.Tensor]:
    """The extra text inputs a model declares (``RetrievalModel.text_inputs``) for dataset captions.

    Keywords come from each caption's own text unless ``dataset_keywords`` is set. Only training
    captions may set it: RSITMD's keyword lists are annotations of the *image*, copied to each of
    its captions, so a val or test caption reading them would carry its answer's annotation
    (AMFMN, Sec. IV-B, filters a query's keywords from its sentence).
    """
    keywords = None
    if dataset_keywords and dataset.keywords is not None:
        keywords = [dataset.keywords[c] for c in caption_ids]
    return text_inputs(vocab, [dataset.captions[c] for c in caption_ids], names, keywords)


def split_data(dataset: RetrievalDataset, split: str, vocab: Vocabulary, max_length: int,
               names: Sequence[str] = (), dataset_keywords: bool = False) -> SplitData:
    """Tokenise the captions of ``split``; image and caption ids stay those of the full dataset.

    ``dataset_keywords``: read the dataset's keyword lists (training captions only; see
    :func:`text_extras`). Evaluation never sets it, so a query carries nothing but its own text.
    """
    image_ids = dataset.split_indices(split)
    local = {img: k for k, img in enumerate(image_ids)}
    caption_ids = [c for c, img in enumerate(dataset.caption_image.tolist()) if img in local]
    tokens, lengths = encode_batch(vocab, [dataset.captions[c] for c in caption_ids], max_length)
    caption_image = dataset.caption_image[caption_ids]
    return SplitData(
        image_ids=torch.tensor(image_ids, dtype=torch.int64),
        tokens=tokens,
        lengths=lengths,
        caption_image=torch.from_numpy(caption_image),
        caption_local_image=np.array([local[int(i)] for i in caption_image], dtype=np.int64),
        caption_ids=torch.tensor(caption_ids, dtype=torch.int64),
        extras=text_extras(dataset, caption_ids, vocab, names, dataset_keywords),
        text_ids=distinct_rows(tokens, lengths)[1],
    )
