"""SCAN: Stacked Cross Attention for Image-Text Matching (Lee, Chen, Hua, Hu, He, ECCV 2018).

SCAN scores an (image, caption) pair by letting the fragments of one side attend over the
fragments of the other, so it is a *pairwise* model: the score is computed from both sides of
each pair and evaluation scores every (image, caption) pair.

Representations (Sec. 3.4–3.5):

* **Regions**: v_i = W_v f_i + b_v for the N_r region features f_i (here RoIAlign features of the
  frozen backbone, standardised per channel), L2-normalised. Padded boxes (``region_mask`` False)
  are set to zero and take no part in anything below.
* **Words**: word embeddings → bidirectional GRU; e_j = (h_j^fwd + h_j^bwd) / 2, the mean of the
  two directions, L2-normalised. Padded positions are zero and masked.

Cross attention, written for a query fragment q (word or region) attending over context fragments
c_k of the other modality (the symbols are the paper's; i indexes regions and j words):

1. s_qk = cos(q, c_k), the region–word cosine matrix (Sec. 3.1).
2. s̄_qk = t(s_qk) / ‖t(s_·k)‖₂, with the threshold t applied and the L2 norm taken over the
   *query* fragments (Sec. 3.1: "threshold the similarities at zero and normalise").
3. α_qk = softmax_k(λ1 s̄_qk) over the context fragments, λ1 the inverse temperature; attended
   vector a_q = Σ_k α_qk c_k.
4. Relevance R(q, a_q) = cos(q, a_q).
5. Pair score: S_LSE = (1/λ2) log Σ_q exp(λ2 R(q, a_q)) or S_AVG = mean_q R(q, a_q).

The two formulations of the paper differ in which side is the query:

* **Text-Image (t2i, Sec. 3.2)**: words attend over regions, the norm of step 2 runs over words,
  the softmax over regions and the pooling over words. Defaults λ1 = 9, LSE with λ2 = 6.
* **Image-Text (i2t, Sec. 3.1)**: regions attend over words, the norm runs over regions, the
  softmax over words and the pooling over regions. Its YAML uses λ1 = 4, LSE with λ2 = 5.

Objective (Sec. 3.3): the bidirectional triplet loss with the hardest negative in the batch
(as VSE++), margin α = 0.2.

Choices where the paper is silent or ambiguous (config fields where it matters):

* **Threshold t** (``attention_norm``): the paper's text clips at zero; the authors' released
  models use a leaky ReLU with slope 0.1 before the L2 norm, which keeps a gradient for negative
  similarities. Default ``"clipped_l2norm"`` is the leaky-ReLU version; ``"relu_l2norm"`` is the
  text's [s]_+; ``"none"`` applies λ1 to the raw cosine. The L2 norm adds 1e-8 to the denominator.
* **Masking.** Padded regions and words get zero softmax weight, do not enter the norm of step 2
  and are not pooled in step 5. A pair with no valid query fragment scores 0.
* **Computation.** a_q is never built: with unit-norm fragments, q · a_q = Σ_k α_qk s_qk and
  ‖a_q‖² = αᵀ G α with G the Gram matrix of the context fragments (N_r × N_r or L × L), so the
  cost per pair is dominated by the region–word cosines. Queries are unit vectors, so
  R = (q · a_q) / ‖a_q‖ (‖a_q‖ clamped at 1e-8). The cosines of a block of images and captions
  come from one matrix product, processed ``pair_block`` pairs at a time to bound memory; tiles
  change speed and memory only, never the scores.
* **Word encodings** are as wide as the longest caption of the encoded chunk; chunk encodings
  are joined by ``concat_encodings``, which zero-pads the word axis. Scoring takes every caption's
  length from ``lengths`` and trims each tile to its longest caption, so the width never matters.
* **Initialisation, loss reduction, training settings**: as for VSE++ (``rsitr.models.vsepp``):
  Xavier-uniform region projection, uniform(-0.1, 0.1) word table, hinges averaged over the
  positive pairs (the paper sums them), captions of one image never negatives of each other;
  the paper's Adam / lr 2e-4 / gradient clipping at 2 belong to the run configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rsitr.losses import triplet_ranking_loss
from rsitr.models.base import Encoding, RetrievalModel
from rsitr.models.layers import (
    FeatureStandardizer,
    RecurrentTextEncoder,
    init_projection,
    init_word_embedding,
    length_mask,
)
from rsitr.models.registry import register_architecture

DIRECTIONS = ("t2i", "i2t")
ATTENTION_NORMS = ("clipped_l2norm", "relu_l2norm", "none")
AGGREGATIONS = ("lse", "mean")
LEAKY_SLOPE = 0.1  # slope of the leaky ReLU of "clipped_l2norm"
NORM_EPS = 1e-8  # added to the L2 norm of step 2; floor of ‖a_q‖


@dataclass
class ScanConfig:
    """Hyper-parameters of SCAN; defaults are the paper's best t2i setting (Sec. 4)."""

    direction: str = "t2i"  # t2i: words attend to regions (Sec. 3.2); i2t: regions attend to words (Sec. 3.1)
    embed_dim: int = 1024  # joint space size d of regions and words (also the GRU width)
    word_dim: int = 300  # word vector size
    gru_layers: int = 1  # stacked bidirectional GRU layers (SCAN: 1)
    attention_norm: str = "clipped_l2norm"  # threshold + L2 norm over queries: clipped_l2norm | relu_l2norm | none
    lambda_softmax: float = 9.0  # λ1, inverse temperature of the attention softmax (t2i: 9, i2t: 4)
    aggregation: str = "lse"  # pooling of the relevances: lse (LogSumExp) | mean (AVG)
    lambda_lse: float = 6.0  # λ2 of LogSumExp pooling (t2i: 6, i2t: 5)
    margin: float = 0.2  # α of the triplet loss
    hardest_negative: bool = True  # True: hardest negative in the batch (SCAN); False: sum over negatives
    pair_block: int = 8192  # (image, caption) pairs scored per tile (speed and memory only)

    def __post_init__(self) -> None:
        for name, allowed in (("direction", DIRECTIONS), ("attention_norm", ATTENTION_NORMS), ("aggregation", AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("pair_block", "gru_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def normalize_over_queries(sims: torch.Tensor, query_mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Step 2: threshold the cosines, then L2-normalise them over the query axis (dim -2).

    Args:
        sims: (..., Q, C) query–context cosines.
        query_mask: (..., Q) valid query fragments, broadcastable to ``sims[..., 0]``.
        kind: one of :data:`ATTENTION_NORMS`.
    """
    if kind == "none":
        return sims
    clipped = F.leaky_relu(sims, LEAKY_SLOPE) if kind == "clipped_l2norm" else sims.clamp(min=0)
    clipped = clipped * query_mask[..., None].to(clipped.dtype)
    # vector_norm has a zero gradient at a zero vector (all-masked or all-clipped columns).
    return clipped / (torch.linalg.vector_norm(clipped, dim=-2, keepdim=True) + NORM_EPS)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``mask``; all-masked rows give all-zero weights."""
    filled = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return filled.softmax(dim=-1) * mask.to(logits.dtype)


def attended_relevance(sims: torch.Tensor, weights: torch.Tensor, context_gram: torch.Tensor) -> torch.Tensor:
    """Step 4 without building a_q: R(q, a_q) = (Σ_k α_qk s_qk) / sqrt(αᵀ G α).

    Args:
        sims: (..., Q, C) cosines of unit-norm queries and contexts.
        weights: (..., Q, C) attention weights α.
        context_gram: (..., C, C) Gram matrix of the unit-norm context fragments, broadcastable.
    """
    dot = (weights * sims).sum(dim=-1)
    norm_sq = (torch.matmul(weights, context_gram) * weights).sum(dim=-1)
    return dot / norm_sq.clamp(min=NORM_EPS**2).sqrt()


def pool_relevance(relevance: torch.Tensor, query_mask: torch.Tensor, kind: str, lambda_lse: float) -> torch.Tensor:
    """Step 5: LogSumExp (1/λ2 · log Σ exp(λ2 R)) or mean of the relevances over valid queries.

    A pair without any valid query fragment scores 0.
    """
    relevance = relevance.float()  # pooled in float32 under bf16 autocast (see layers.full_precision)
    mask = query_mask.expand_as(relevance)
    if kind == "mean":
        weights = mask.to(relevance.dtype)
        return (relevance * weights).sum(dim=-1) / weights.sum(dim=-1).clamp(min=1.0)
    logits = (lambda_lse * relevance).masked_fill(~mask, torch.finfo(relevance.dtype).min)
    pooled = torch.logsumexp(logits, dim=-1) / lambda_lse
    return torch.where(mask.any(dim=-1), pooled, torch.zeros_like(pooled))


@register_architecture("scan", ScanConfig)
class SCAN(RetrievalModel):
    """SCAN over cached region features (``regions``, ``region_mask``), t2i or i2t."""

    image_inputs = ("regions", "region_mask")

    def __init__(self, config: ScanConfig, feature_dims: dict[str, Any], vocab_size: int) -> None:
        super().__init__(config)
        region_channels = int(feature_dims["region_channels"])
        self.standardize = FeatureStandardizer({"regions": region_channels})
        self.region_fc = nn.Linear(region_channels, config.embed_dim)  # W_v, b_v
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        self.gru = RecurrentTextEncoder(config.word_dim, config.embed_dim, config.gru_layers)
        init_projection(self.region_fc)
        init_word_embedding(self.word_embedding)

    @property
    def pairwise(self) -> bool:
        return True

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        """Unit-norm region vectors v_i (n, N_r, d), zero for padded boxes, and the region mask."""
        mask = features["region_mask"].bool()
        regions = F.normalize(self.region_fc(self.standardize("regions", features["regions"])), dim=-1)
        return {"regions": regions * mask[..., None].to(regions.dtype), "region_mask": mask}

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Encoding:
        """Unit-norm word vectors e_j (n, L, d), L the chunk's longest caption (zero beyond each length)."""
        tokens = tokens[:, : int(lengths.max())]
        words = self.gru.encode(self.word_embedding(tokens), lengths).words()
        words = F.normalize(words, dim=-1)  # padded positions are zero and stay zero
        return {"words": words, "lengths": lengths}

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """S(image, caption) for every pair, scored in tiles of about ``pair_block`` pairs."""
        n_images, n_texts = images["regions"].shape[0], texts["lengths"].shape[0]
        if n_images == 0 or n_texts == 0:
            return images["regions"].new_zeros(n_images, n_texts)
        chunk = max(1, self.config.pair_block // n_images)
        parts = [
            self._score_tile(images, texts["words"][j : j + chunk], texts["lengths"][j : j + chunk])
            for j in range(0, n_texts, chunk)
        ]
        return torch.cat(parts, dim=1)

    def _score_tile(self, images: Encoding, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores (n_images, n_t) of all images against one chunk of n_t captions."""
        length = int(lengths.max())
        words = words[:, :length]
        word_mask = length_mask(lengths, length)
        regions, region_mask = images["regions"], images["region_mask"]
        n_i, n_r, d = regions.shape
        n_t = words.shape[0]
        cosines = (regions.reshape(-1, d) @ words.reshape(-1, d).T).view(n_i, n_r, n_t, length)  # step 1
        if self.config.direction == "t2i":
            sims = cosines.permute(0, 2, 3, 1)  # (n_i, n_t, L, N_r): words query regions
            query_mask = word_mask[None]  # (1, n_t, L)
            context_mask = region_mask[:, None, None, :]
            gram = (regions @ regions.transpose(1, 2))[:, None]  # (n_i, 1, N_r, N_r)
        else:
            sims = cosines.permute(0, 2, 1, 3)  # (n_i, n_t, N_r, L): regions query words
            query_mask = region_mask[:, None, :]  # (n_i, 1, N_r)
            context_mask = word_mask[None, :, None, :]
            gram = (words @ words.transpose(1, 2))[None]  # (1, n_t, L, L)
        return self.cross_attention(sims, query_mask, context_mask, gram)

    def cross_attention(
        self, sims: torch.Tensor, query_mask: torch.Tensor, context_mask: torch.Tensor, context_gram: torch.Tensor
    ) -> torch.Tensor:
        """Steps 2–5 on (..., Q, C) cosines: pair scores (...)."""
        normalized = normalize_over_queries(sims, query_mask, self.config.attention_norm)  # step 2
        weights = masked_softmax(self.config.lambda_softmax * normalized, context_mask)  # step 3
        relevance = attended_relevance(sims, weights, context_gram)  # step 4
        return pool_relevance(relevance, query_mask, self.config.aggregation, self.config.lambda_lse)  # step 5

    def ranking_loss(self, sims: torch.Tensor, image_ids: torch.Tensor,
                     caption_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hardest-negative (or summed) triplet loss of a (B, B) score matrix with positives on the diagonal."""
        reduction = "hardest" if self.config.hardest_negative else "sum"
        return triplet_ranking_loss(sims, self.non_negatives(image_ids, caption_ids), self.config.margin, reduction)

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.ranking_loss(self.similarity(images, texts), image_ids, caption_ids)}
