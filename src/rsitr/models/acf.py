"""ACF: remote-sensing image–text retrieval by Attention Correction and Filtering.

Yang, Li, Wang, Xie, Mao, Yin, Remote Sensing 17 (2025) 503; equation numbers are the paper's.

Image side (Sec. 3.1.1): a ViG backbone turns the image into a graph of 7 × 7 patch nodes. The
multi-level node fusion (Eq. 1) merges the low- and mid-level node features of every patch into
the k = 49 region features v_i; the global feature (Eq. 2) is their pooled mean combined with the
last ViG layer x_t.
Text side (Sec. 3.1.2): word vectors → bidirectional GRU, directions averaged (Eq. 3) → graph
attention network (GAT) over the words → word features w_j (h_j in Eq. 3); their mean is the
global text feature T^(g) (Eq. 4).
Matching (Sec. 3.2, 3.3): cosine region–word similarities, positive part normalised (Eq. 5) and
soft-maxed with inverse temperature λ (Eq. 6); the attention is corrected by the pair's global
similarity sim_g with threshold p (Eq. 7–9) and filtered with threshold q (Eq. 10–11); the pair
score averages, in both directions, the cosine between each fragment and its attended
counterpart (Eq. 12–14). The loss is the triplet ranking loss on that score plus the same loss
on the global similarity, L_g (Eq. 15).

Choices where the paper is silent or ambiguous (each is a config field where it matters):

* **Frozen, cached backbone.** The paper does not say whether ViG is fine-tuned. Here it is frozen
  and its stage outputs are cached (``features.maps`` of the model YAML): ``stage2``, ``stage3``
  and ``stage4`` adaptive-average-pooled to 7 × 7, i.e. 49 nodes each. Everything from Eq. 1 on
  is trained. Each map is standardised per channel with training-split statistics over all
  nodes (``layers.FeatureStandardizer``) before Eq. 1. Cached features also mean that the
  paper's image augmentation during training (cropping, rotation; Sec. 4.2) is not applied.
* **Levels.** "Low" and "mid" level (Eq. 1) are the outputs of stages 2 and 3 (28 × 28 and
  14 × 14 nodes at 224 px, pooled to the 7 × 7 patch grid); the "last layer" x_t (Eq. 2) is
  stage 4, the 7 × 7 node graph itself.
* **Fusion (Eq. 1).** ``v_i = W_f [x_l,i ; x_m,i] + b``: the two levels of node i concatenated
  and projected to d. **Eq. 2** reads "×" as an element-wise product:
  ``v^(g) = mean_i(v_i) ⊙ (W_t mean_i(x_t,i) + b_t)``. With ``fusion=False`` (ablation M2 off)
  the regions are the projected last-stage nodes ``W_t x_t,i`` and v^(g) is their mean.
* **Word graph (GAT).** The paper does not define the graph; every valid word is linked to every
  valid word of its caption, itself included, and padding is masked. One GAT layer with
  ``gat_heads`` heads (LeakyReLU 0.2 scores, heads concatenated), ELU, and a residual connection
  to the BiGRU feature so that each word keeps its own context. ``gat=False`` is ablation M1 off.
* **λ** (Eq. 6) is not reported; ``lambda_softmax = 9`` is SCAN's value, whose attention ACF
  builds on. Eq. 5's normalisation runs over the attending fragments (regions for
  image-to-text, words for text-to-image) and the soft-max over the attended ones, as in SCAN.
* **Correction (Eq. 7–9).** Eq. 9 as printed divides ``(sim_g − p) α_ij`` by its own sum over j,
  which cancels the factor exactly and would make the unit a no-op, while the text says the
  local similarity is "proportionally amplified" when sim_g is large and "diminished" when it is
  small. We keep both: α' of Eq. 9 is what the equation gives, the unit-mass weights
  ``α' = (sim_g − p) α / Σ_j (sim_g − p) α = α / Σ_j α`` (the limit at sim_g = p), and the factor
  the text describes, ``sim_g − p`` (positive above p, zero at p, negative below), is kept as the
  mass of the corrected attention. Because the cosine R of Eq. 14 ignores the length of an
  attended vector, that mass is applied to the score: every local term is
  ``(sim_g − p) · cos(fragment, attended counterpart)``. ``correction=False`` (M3 off) uses a
  factor of 1.
* **Filtering (Eq. 10–11)** acts on α' of Eq. 9, the unit-mass weights, so q is a threshold on
  the shape of the attention and does not depend on sim_g: with ``q = 0.1`` a weight survives
  when it is within 0.1 of the fragment's largest weight, for a well-matched pair, for one with
  sim_g = p and for one below p alike. (Filtering the weights scaled by ``sim_g − p`` instead
  would shrink every difference with the factor: near sim_g = p nothing would be filtered, and
  q would filter differently at every global similarity.) Eq. 10 keeps a weight when
  ``|α'_ij − max_j α'_ij| < q`` (``filter_rule="difference"``, default); the text calls q a
  "ratio" threshold, which ``filter_rule="ratio"`` implements as ``α'_ij ≥ q · max_j α'_ij``.
  Eq. 11 as printed multiplies the kept weights by H(α') = α' again, i.e. renormalises their
  squares (``filter_reweight=True``, default); ``filter_reweight=False`` renormalises the kept
  weights themselves. Padding is never kept. ``filtering=False`` is ablation M4 off; the
  attended counterparts then use α' = α.
* **Score (Eq. 14)** is ``R(v_i, a^t_i)`` averaged over the k regions plus ``R(a^v_j, w_j)``
  averaged over the m valid words (the printed ``R(v_i, v_i)`` is read as the former). Padded
  words take no part.
* **Loss (Eq. 15)** is read as the usual hinge ``[δ − R(I, T) + R(Î, T)]_+ + [δ − R(I, T) +
  R(I, T̂)]_+`` summed over the batch's negatives and averaged over its positive pairs
  (``loss_reduction="hardest"`` keeps only the hardest negative); L_g is the same loss on
  ``cos(v^(g), T^(g))`` with the same margin and weight 1 (``global_loss=False``: M5 off).
  Captions of the same image are never negatives.
* **Scoring cost.** The cosine of an attended vector is computed from the region–word dot
  products and the Gram matrices of the regions (49 × 49) and of the words (m × m), so no
  attended vector is materialised; pairs are scored in tiles of ``pair_block`` pairs with captions
  sorted by length. A pair's score depends on that pair only; tiles change speed and memory, not
  results.
* **Word width.** ``encode_text`` returns words as wide as the chunk's longest caption; chunk
  encodings are joined by ``concat_encodings``, which zero-pads the word axis. Scoring takes every
  caption's length from ``lengths`` and trims each tile to its longest caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rsitr.errors import ConfigError
from rsitr.losses import triplet_ranking_loss
from rsitr.models.base import Encoding, RetrievalModel
from rsitr.models.layers import FeatureStandardizer, RecurrentTextEncoder, cosine_matrix, length_mask, masked_mean
from rsitr.models.registry import register_architecture

#: Backbone levels read from the feature cache: low and mid (Eq. 1) and the last layer x_t (Eq. 2).
LOW_LEVEL, MID_LEVEL, TOP_LEVEL = "stage2", "stage3", "stage4"
FILTER_RULES = ("difference", "ratio")
_EPS = 1e-8


@dataclass
class AcfConfig:
    """Hyper-parameters of ACF; defaults are the paper's (Sec. 4.2–4.3) where it gives them."""

    embed_dim: int = 512  # d, size of region, word and global features (Sec. 4.2: 512)
    word_dim: int = 300  # word vectors (Sec. 4.2: 300)
    p: float = 0.3  # attention-correction threshold on sim_g (Eq. 8; Table 1: 0.3 best)
    q: float = 0.1  # attention-filtering threshold (Eq. 10; Table 2: 0.1 best)
    margin: float = 0.2  # δ of Eq. 15 (Table 3: 0.2 best)
    lambda_softmax: float = 9.0  # λ of Eq. 6, inverse temperature (not reported; SCAN's 9)
    gat: bool = True  # M1: GAT over the BiGRU word features (False: BiGRU words only)
    gat_heads: int = 4  # attention heads of the word GAT (not reported)
    fusion: bool = True  # M2: multi-level node fusion, Eq. 1–2 (False: last-stage nodes as regions)
    correction: bool = True  # M3: attention correction by global similarity, Eq. 7–9
    filtering: bool = True  # M4: attention filtering, Eq. 10–11
    global_loss: bool = True  # M5: global-similarity loss L_g of Eq. 15
    filter_rule: str = "difference"  # Eq. 10: "difference" (max − α' < q, as printed) or "ratio" (α' ≥ q·max)
    filter_reweight: bool = True  # Eq. 11 as printed: kept weights times H(α') = α' before renormalising
    loss_reduction: str = "sum"  # triplet hinge summed over negatives ("sum") or hardest only ("hardest")
    pair_block: int = 1024  # (image, caption) pairs per scoring tile (memory and speed only)

    def __post_init__(self) -> None:
        if self.filter_rule not in FILTER_RULES:
            raise ValueError(f"filter_rule must be one of {FILTER_RULES}, got {self.filter_rule!r}")
        if self.loss_reduction not in ("sum", "hardest"):
            raise ValueError(f"loss_reduction must be 'sum' or 'hardest', got {self.loss_reduction!r}")
        if self.embed_dim % self.gat_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by gat_heads {self.gat_heads}")
        if self.pair_block < 1:
            raise ValueError(f"pair_block must be >= 1, got {self.pair_block}")


# ----------------------------------------------------------------------------------------------
# Attention correction and filtering (Eq. 7–11)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """Square root floored at ``_EPS``: finite value and gradient at zero (padding, all-negative rows)."""
    return x.clamp(min=_EPS * _EPS).sqrt()


def _norm(x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
    """l2 norm floored at ``_EPS`` (see :func:`_sqrt`)."""
    return _sqrt(x.square().sum(dim=dim, keepdim=keepdim))


def correct_attention(weights: torch.Tensor, global_sim: torch.Tensor, p: float,
                      dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8–9: the corrected weights α' and the correction's mass ``sim_g − p``.

    Args:
        weights: attention weights α (non-negative along ``dim``).
        global_sim: sim_g of Eq. 7, broadcastable to ``weights`` (one value per pair).
        p: the correction threshold.

    Returns:
        ``(α', mass)``: α' = α / Σ_dim α, what Eq. 9 gives for any sim_g (the factor of Eq. 8
        cancels; at sim_g = p this is the limit), which Eq. 10–11 filter; and ``sim_g − p``,
        the factor the paper's text describes, which :class:`AttentionScorer` applies to the
        score (see the module docstring).
    """
    return weights / weights.sum(dim=dim, keepdim=True).clamp(min=_EPS), global_sim - p


def filter_attention(weights: torch.Tensor, q: float, dim: int = -1, valid: torch.Tensor | None = None,
                     rule: str = "difference", reweight: bool = True) -> torch.Tensor:
    """Eq. 10–11: drop weak attention weights and renormalise the rest to sum to one along ``dim``.

    Args:
        weights: the corrected weights α' of Eq. 9 (non-negative, unit mass along ``dim``).
        q: the filtering threshold, on the scale of those weights.
        valid: bool mask broadcastable to ``weights``; invalid positions (padding) count as zero
            weight, so they never keep any mass.
        rule: ``"difference"`` keeps ``max − α' < q`` (Eq. 10); ``"ratio"`` keeps ``α' ≥ q·max``.
        reweight: Eq. 11 as printed, kept weights multiplied by H(α') = α' (squared) before
            renormalising; False renormalises the kept weights themselves.

    Returns:
        Non-negative weights summing to one along ``dim`` (the largest weight is always kept).
    """
    if valid is not None:
        weights = weights * valid.to(weights.dtype)
    peak = weights.amax(dim=dim, keepdim=True)
    keep = (peak - weights < q) if rule == "difference" else (weights >= q * peak)
    kept = torch.where(keep, weights * weights if reweight else weights, torch.zeros_like(weights))
    return kept / kept.sum(dim=dim, keepdim=True).clamp(min=_EPS)


def base_attention(cosines: torch.Tensor, word_mask: torch.Tensor, attend_words: bool, lam: float) -> torch.Tensor:
    """Eq. 5–6 on (…, k, m) region–word cosines: positive part, l2-normalised, soft-max with λ.

    ``attend_words=True`` (image-to-text, α^t): normalise over regions, soft-max over the valid
    words. ``False`` (text-to-image, α^v): normalise over words, soft-max over regions.
    """
    positive = cosines.clamp(min=0) * word_mask.to(cosines.dtype)
    if attend_words:
        normed = positive / _norm(positive, dim=-2)
        return (lam * normed).masked_fill(~word_mask, float("-inf")).softmax(dim=-1)
    normed = positive / _norm(positive, dim=-1)
    return (lam * normed).softmax(dim=-2)


# ----------------------------------------------------------------------------------------------
# Encoders


def as_nodes(feature_map: torch.Tensor) -> torch.Tensor:
    """(n, C, h, w) backbone map → (n, h·w, C) node features, row-major node order."""
    return feature_map.flatten(2).transpose(1, 2)


class NodeFusion(nn.Module):
    """Multi-level node fusion (Eq. 1) and the global visual feature (Eq. 2)."""

    def __init__(self, low_channels: int, mid_channels: int, top_channels: int, dim: int, fuse: bool) -> None:
        super().__init__()
        self.fuse = nn.Linear(low_channels + mid_channels, dim) if fuse else None  # W_f, Eq. 1
        self.top = nn.Linear(top_channels, dim)  # W_t, projects x_t (Eq. 2)

    def forward(self, low: torch.Tensor, mid: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, N, C_*) node features → regions v (n, N, d) and global v^(g) (n, d)."""
        if self.fuse is None:
            regions = self.top(top)
            return regions, regions.mean(dim=1)
        regions = self.fuse(torch.cat([low, mid], dim=-1))  # Eq. 1
        return regions, regions.mean(dim=1) * self.top(top.mean(dim=1))  # Eq. 2


class WordGAT(nn.Module):
    """One multi-head graph-attention layer over the valid words of each caption (Eq. 3).

    Scores ``LeakyReLU(a_dst·W h_i + a_src·W h_j)`` per head, soft-maxed over the valid words j
    (the graph is complete, self-loops included), heads concatenated, ELU, plus the input.
    """

    def __init__(self, dim: int, heads: int, slope: float = 0.2) -> None:
        super().__init__()
        self.heads = heads
        self.slope = slope
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attend_src = nn.Parameter(torch.empty(heads, dim // heads))
        self.attend_dst = nn.Parameter(torch.empty(heads, dim // heads))
        nn.init.xavier_uniform_(self.attend_src)
        nn.init.xavier_uniform_(self.attend_dst)

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, dim = words.shape
        h = self.proj(words).view(n, length, self.heads, dim // self.heads)
        src = (h * self.attend_src).sum(-1)  # (n, L, H)
        dst = (h * self.attend_dst).sum(-1)
        scores = F.leaky_relu(dst[:, :, None, :] + src[:, None, :, :], self.slope)  # (n, i, j, H)
        scores = scores.masked_fill(~mask[:, None, :, None], float("-inf"))
        mixed = torch.einsum("nijh,njhc->nihc", scores.softmax(dim=2), h).reshape(n, length, dim)
        return words + F.elu(mixed)


# ----------------------------------------------------------------------------------------------
# Pair scoring


@dataclass
class _TextTile:
    """Words of a caption tile with the quantities every image tile reuses."""

    words: torch.Tensor  # (t, m, d)
    norms: torch.Tensor  # (t, m)
    gram: torch.Tensor  # (t, m, m)
    mask: torch.Tensor  # (t, m) bool
    global_: torch.Tensor  # (t, d), l2-normalised


@dataclass
class _ImageTile:
    """Regions of an image tile with their norms and Gram matrix."""

    regions: torch.Tensor  # (b, k, d)
    norms: torch.Tensor  # (b, k)
    gram: torch.Tensor  # (b, k, k)
    global_: torch.Tensor  # (b, d), l2-normalised


class AttentionScorer:
    """Eq. 5–14 for every pair of an image tile and a caption tile, without attended vectors.

    For weights β along the words, ``cos(v_i, Σ_j β_ij w_j) = Σ_j β_ij (v_i·w_j) / (|v_i| √(β_i G_w β_i))``
    with G_w the caption's word Gram matrix (and symmetrically with the region Gram matrix G_v for
    the text-to-image direction), so both directions need only the region–word dot products.
    """

    def __init__(self, config: AcfConfig) -> None:
        self.config = config

    def refine(self, weights: torch.Tensor, global_sim: torch.Tensor, dim: int,
               valid: torch.Tensor | None) -> torch.Tensor:
        """Correction (Eq. 8–9) then filtering (Eq. 10–11) of weights α along ``dim``.

        Returns unit-mass weights that do not depend on ``global_sim``: the filter reads α' of
        Eq. 9, and the correction's mass ``sim_g − p`` is applied to the score by :meth:`score`.
        Without filtering that leaves α itself.
        """
        c = self.config
        if not c.filtering:
            return weights
        if c.correction:
            weights, _ = correct_attention(weights, global_sim, c.p, dim)
        return filter_attention(weights, c.q, dim, valid, c.filter_rule, c.filter_reweight)

    def score(self, image: _ImageTile, text: _TextTile) -> torch.Tensor:
        """(b, t) pair scores R(I, T) of Eq. 14, times the correction factor when it is on."""
        c = self.config
        b, k, d = image.regions.shape
        t, m, _ = text.words.shape
        dots = (image.regions.reshape(b * k, d) @ text.words.reshape(t * m, d).T).view(b, k, t, m)
        dots = dots.permute(0, 2, 1, 3)  # (b, t, k, m)
        cosines = dots / (image.norms[:, None, :, None] * text.norms[None, :, None, :])  # Eq. 5
        mask = text.mask[None, :, None, :]  # (1, t, 1, m)
        global_sim = image.global_ @ text.global_.T  # sim_g, Eq. 7
        pair_sim = global_sim[:, :, None, None]

        # image-to-text: every region attends to the words (Eq. 6, 12), R(v_i, a^t_i)
        beta = self.refine(base_attention(cosines, mask, True, c.lambda_softmax), pair_sim, -1, mask)
        spread = _sqrt((beta @ text.gram[None] * beta).sum(-1))  # |Σ_j β_ij w_j|
        region_terms = (beta * dots).sum(-1) / (image.norms[:, None, :] * spread)
        image_to_text = region_terms.mean(dim=-1)

        # text-to-image: every word attends to the regions (Eq. 13), R(a^v_j, w_j)
        beta = self.refine(base_attention(cosines, mask, False, c.lambda_softmax), pair_sim, -2, None)
        spread = _sqrt((image.gram[:, None] @ beta * beta).sum(-2))  # |Σ_i β_ij v_i|
        word_terms = (beta * dots).sum(-2) / (text.norms[None] * spread)
        word_terms = torch.where(text.mask[None], word_terms, torch.zeros_like(word_terms))
        text_to_image = word_terms.sum(-1) / text.mask.sum(-1).clamp(min=1)[None]

        local = image_to_text + text_to_image  # Eq. 14
        return (global_sim - c.p) * local if c.correction else local


def _image_tile(images: Encoding, rows: slice) -> _ImageTile:
    regions = images["regions"][rows]
    return _ImageTile(regions, _norm(regions, keepdim=False), regions @ regions.transpose(1, 2),
                      F.normalize(images["global"][rows], dim=-1))


def _text_tile(texts: Encoding, index: torch.Tensor) -> _TextTile:
    lengths = texts["lengths"][index]
    words = texts["words"][index, : int(lengths.max())]
    return _TextTile(words, _norm(words, keepdim=False), words @ words.transpose(1, 2),
                     length_mask(lengths, words.shape[1]), F.normalize(texts["global"][index], dim=-1))


# ----------------------------------------------------------------------------------------------
# The model


@register_architecture("acf", AcfConfig)
class ACF(RetrievalModel):
    """ACF over cached ViG node maps (``map_stage2``, ``map_stage3``, ``map_stage4``)."""

    image_inputs = (f"map_{LOW_LEVEL}", f"map_{MID_LEVEL}", f"map_{TOP_LEVEL}")
    scene_embedding = "global"  # v^(g)

    def __init__(self, config: AcfConfig, feature_dims: dict[str, Any], vocab_size: int) -> None:
        super().__init__(config)
        channels = self._map_channels(feature_dims)
        d = config.embed_dim
        self.standardize = FeatureStandardizer({f"map_{level}": c for level, c in channels.items()}, moments="std_mean")
        self.nodes = NodeFusion(channels[LOW_LEVEL], channels[MID_LEVEL], channels[TOP_LEVEL], d, config.fusion)
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        self.gru = RecurrentTextEncoder(config.word_dim, d)  # Eq. 3
        self.gat = WordGAT(d, config.gat_heads) if config.gat else None
        self.scorer = AttentionScorer(config)

    @staticmethod
    def _map_channels(feature_dims: dict[str, Any]) -> dict[str, int]:
        """Channels of the three cached node maps; ConfigError if one is missing or grids differ."""
        maps = feature_dims.get("maps") or {}
        levels = (LOW_LEVEL, MID_LEVEL, TOP_LEVEL)
        missing = [level for level in levels if level not in maps]
        if missing:
            raise ConfigError(f"acf needs the cached node maps {', '.join(levels)} (features.maps, e.g. "
                              f"'{LOW_LEVEL}:7'); missing: {', '.join(missing)}")
        sizes = {int(maps[level][1]) for level in levels}
        if len(sizes) != 1:
            raise ConfigError(f"acf fuses nodes of one grid; the maps {', '.join(levels)} have sizes {sorted(sizes)}")
        return {level: int(maps[level][0]) for level in levels}

    @property
    def pairwise(self) -> bool:
        """True: the attention of Eq. 6–13 runs on each (image, caption) pair."""
        return True

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        """Regions v_i (n, N, d) and global v^(g) (n, d) from the standardised node maps."""
        low, mid, top = (as_nodes(self.standardize(key, features[key])) for key in self.image_inputs)
        regions, global_ = self.nodes(low, mid, top)  # Eq. 1–2
        return {"regions": regions, "global": global_}

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Encoding:
        """Words w_j (n, L, d), zero past each caption, lengths, global T^(g) (n, d).

        L is the chunk's longest caption; chunks of different widths are joined by
        ``concat_encodings``, which zero-pads the word axis.
        """
        states = self.gru.encode(self.word_embedding(tokens[:, : int(lengths.max())]), lengths)
        words, mask = states.words(), states.mask  # Eq. 3, directions averaged
        if self.gat is not None:
            words = self.gat(words, mask)
        words = words * mask[..., None].to(words.dtype)
        return {
            "words": words,
            "lengths": lengths.to(words.device),
            "global": masked_mean(words, mask),  # Eq. 4
        }

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """(n_images, n_texts) ACF scores, computed in tiles of about ``pair_block`` pairs."""
        n_images = images["regions"].shape[0]
        n_texts = texts["lengths"].shape[0]
        order = torch.argsort(texts["lengths"], stable=True)  # similar lengths share a tile
        image_rows = max(1, min(n_images, 8, self.config.pair_block))
        text_cols = max(1, self.config.pair_block // image_rows)
        image_tiles = [_image_tile(images, slice(i, i + image_rows)) for i in range(0, n_images, image_rows)]
        columns = []
        for j in range(0, n_texts, text_cols):
            text = _text_tile(texts, order[j : j + text_cols])
            columns.append(torch.cat([self.scorer.score(image, text) for image in image_tiles], dim=0))
        return torch.cat(columns, dim=1)[:, torch.argsort(order)]

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Eq. 15: triplet loss on the ACF score plus, with ``global_loss``, L_g on cos(v^(g), T^(g))."""
        c = self.config
        same = self.non_negatives(image_ids, caption_ids)
        local = triplet_ranking_loss(self.similarity(images, texts), same, c.margin, c.loss_reduction)
        terms = {"local": local.detach()}
        loss = local
        if c.global_loss:
            global_sims = cosine_matrix(images["global"], texts["global"])
            global_ = triplet_ranking_loss(global_sims, same, c.margin, c.loss_reduction)
            terms["global"] = global_.detach()
            loss = loss + global_  # L_g, Eq. 15
        return {"loss": loss, **terms}
