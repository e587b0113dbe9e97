"""Ranking losses over a batch of (image, caption) pairs.

Batches are drawn over captions, so two captions of one image can share a batch. Such a pair is a
positive, not a negative: every loss here takes a ``same_image`` mask and never pushes those
apart.
"""

from __future__ import annotations

import torch


def same_image_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: True where the row pair and column pair show the same image."""
    return image_ids[:, None] == image_ids[None, :]


def shared_text_mask(image_texts: torch.Tensor, caption_texts: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: True where caption j says word for word what one of image i's own captions says.

    Args:
        image_texts: (B, K) text ids of the K captions of each row's image (``-1`` pads images
            with fewer captions); equal ids are equal token sequences.
        caption_texts: (B,) text id of each column's caption.

    In UCM-Captions most captions recur verbatim across images ("there are many buildings"), so
    another image's copy of a positive caption is a true description of the anchor: as a
    negative it asks the model to rank a sentence below itself. Such pairs are excluded in both
    directions of the loss, like the captions of the same image (which this mask contains).
    """
    hits = image_texts[:, :, None] == caption_texts[None, None, :]
    return (hits & (caption_texts >= 0)[None, None, :]).any(dim=1)


def triplet_ranking_loss(
    sims: torch.Tensor,
    same_image: torch.Tensor,
    margin: float | torch.Tensor = 0.2,
    reduction: str = "sum",
) -> torch.Tensor:
    """Bidirectional triplet ranking loss (DOVE Eq. 30; VSE++ with ``reduction="hardest"``).

    Args:
        sims: (B, B) scores; ``sims[i, j]`` is image i of the batch against caption j; the
            positives are on the diagonal.
        same_image: (B, B) mask of pairs that show the same image; they are excluded as negatives.
        margin: α of Eq. 30; a (B, B) tensor gives every (image i, caption j) entry its own
            margin (AMFMN's dynamic margin, Eq. 29).
        reduction: ``"sum"`` sums the hinge over all negatives (Eq. 30 as written); ``"hardest"``
            keeps only the hardest negative of each anchor (VSE++).

    Returns:
        The loss averaged over the B positive pairs (a mean over anchors keeps the learning rate
        independent of the batch size; within an anchor the negatives are summed or maxed).
    """
    if reduction not in ("sum", "hardest"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'sum' or 'hardest'")
    positive = sims.diagonal()
    # caption retrieval: image i (row) against negative captions j
    cost_caption = (margin - positive[:, None] + sims).clamp(min=0).masked_fill(same_image, 0.0)
    # image retrieval: caption j (column) against negative images i
    cost_image = (margin - positive[None, :] + sims).clamp(min=0).masked_fill(same_image, 0.0)
    if reduction == "hardest":
        return cost_caption.max(dim=1).values.mean() + cost_image.max(dim=0).values.mean()
    return cost_caption.sum(dim=1).mean() + cost_image.sum(dim=0).mean()

