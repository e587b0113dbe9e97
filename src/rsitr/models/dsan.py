"""DSAN: Deep Semantic Alignment Network with its Semantic Alignment Module (SAM).

Cheng, Zhou, Fu, Xu, Zhang, "A Deep Semantic Alignment Network for the Cross-Modal Image-Text
Retrieval in Remote Sensing" (IEEE JSTARS 2021); equation numbers are the paper's.

Image side (Sec. III-A, IV-B): the K = 64 cells of the 8 × 8 × 2048 ``Mixed_7c`` map of a frozen,
ImageNet-pretrained Inception-v3 are the visual features F = {f_1 .. f_K}.
Text side (Sec. III-B): word vectors (300-d, random init) → one bidirectional GRU of hidden size
D = 2048 (Eq. 1–2); a word's feature t_j is the mean of its two directions (Eq. 3–4).
SAM (Sec. III-C) scores an (image, caption) pair, in one of two variants:

* ``variant="i2t"``, image–text alignment (Eq. 5–12, Algorithm 1): every region attends to the
  words (Eq. 5–8) giving e_i^w; a gate (Eq. 9–11) updates the region, f̃_i = (1 − g) f_i + g c,
  and S(F, T) is the mean over regions of cos(f̃_i, e_i^w) (Eq. 12);
* ``variant="t2i"``, text–image alignment (Eq. 13–17): every word attends to the regions giving
  e_j^r; the gate updates the word, and S is the mean over words of cos(t̃_j, e_j^r) (Eq. 17).
  The paper reports this variant as the better one ("t-i"), so it is the default.

The score needs both sides, so DSAN is a *pairwise* model: ``encode_image`` and ``encode_text``
depend on one item each and :meth:`DSAN.similarity` runs SAM for every (image, caption) pair.
Training uses the triplet loss with the hardest in-batch negative in both directions (Eq. 18).

Choices where the paper is silent or ambiguous (config fields where it matters):

* **Normalisation axis of Eq. 6 in the t2i variant** (``sim_norm``). Eq. 6 normalises the
  clipped cosines over the regions i, the side that attends in i2t; Eq. 13 reuses the symbol
  without restating it. ``"query"`` (default) normalises over the attending side in both variants
  (regions for i2t, exactly Eq. 6; words for t2i, its mirror), which is the clipped-l2 scheme of
  SCAN (Lee et al., the paper's [32]), which uses the same α = 9 and margin 0.2. ``"regions"``
  applies Eq. 6 verbatim in both variants (in t2i it then normalises along the softmax axis); the
  two settings coincide for i2t. A column with no positive cosine normalises to zeros, i.e.
  uniform attention.
* **Visual projection.** Sec. IV-B sets "the dimension of visual feature to 2048" next to a
  2048-channel CNN, and the paper shows no projection. The CNN is frozen, so without one the image
  side would have no learnt parameter outside the i2t gate; a learnt linear map (C → D) is applied
  to every grid cell, as in the SCAN-style encoders the paper builds on. It is also what lets
  ``embed_dim`` differ from the CNN width. No l2 normalisation follows it: the equations only
  normalise inside the cosines of Eq. 5, 12 and 17, which are scale-invariant.
* **Gate** (Eq. 9–11, 14–16): ``l = concat(x, e) W + b`` is one ``Linear(2D, D)`` per gate part
  (update gate g, memory cell c), with the sigmoid the paper writes for *both* (a GRU would use
  tanh for the cell). ``gate=False`` sets the updated feature to the original one (the "without
  gate" ablation SAM-6 of Table VI). Since l is linear in e and e is linear in the attention
  weights, ``e W_e = Σ a · (x W_e)``: the e-half of each gate is applied to the attended items
  once per item, not once per pair (same values, far fewer multiply-adds).
* **Input resolution.** Sec. IV-B resizes images to 224 px, which gives a 5 × 5 Inception grid,
  yet uses 64 features per image; 64 = 8 × 8 is the grid at Inception's native 299 px, so the
  model's feature spec asks for 299 px and the ``mixed_7c`` map pooled to 8 × 8.
* **Padding.** Padded words get zero attention (i2t), do not enter the normalisation of Eq. 6
  (t2i) and are left out of the mean of Eq. 17. ``encode_text`` returns words as wide as the
  chunk's longest caption; chunk encodings are joined by ``concat_encodings``, which zero-pads the
  word axis, and scoring takes every caption's length from ``lengths`` and trims to the longest
  caption present.
* **Input standardisation.** The cached grid features are standardised per channel with
  training-split statistics (one mean/std per channel over all cells of all training images,
  saved in the checkpoint) before the projection: frozen-CNN features of remote-sensing images are
  nearly collinear, which slows the first layer down.
* **Loss.** Eq. 18 takes positives and negatives by class label; this package retrieves
  instances, so a caption's positive is its own image, captions of the same image are never
  negatives of each other, and the hinge is averaged (not summed) over the B anchors.
* **Unspecified sizes.** One GRU layer; no dropout; ``nn.Embedding``'s default N(0, 1) init.
  Learning rate 5e-4, batch size 16 and 120 epochs (Sec. IV-B) belong to the run config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from rsitr.errors import ConfigError
from rsitr.losses import triplet_ranking_loss
from rsitr.models.base import Encoding, RetrievalModel
from rsitr.models.layers import FeatureStandardizer, RecurrentTextEncoder, length_mask, row_cosine
from rsitr.models.registry import register_architecture

#: The backbone level whose grid DSAN reads (Inception-v3's last block, 2048 channels).
GRID_LEVEL = "mixed_7c"
#: Feature-cache key of that grid: float32 (n, C, S, S).
GRID_KEY = f"map_{GRID_LEVEL}"
VARIANTS = ("t2i", "i2t")
SIM_NORMS = ("query", "regions")
#: Floor of the l2 norm in Eq. 6 (all clipped cosines zero → all-zero row, i.e. uniform attention).
_NORM_EPS = 1e-8
#: A tile of SemanticAlignment: i2t and t2i take their optional offsets at different argument places.
_Tile = Callable[..., torch.Tensor]


@dataclass
class DsanConfig:
    """Hyper-parameters of DSAN; defaults are the paper's (Sec. III, IV-B)."""

    variant: str = "t2i"  # SAM form: t2i = words attend to regions (Eq. 13–17), i2t = regions attend to words (Eq. 5–12)
    embed_dim: int = 2048  # D: visual feature width and Bi-GRU hidden size (Sec. IV-B)
    word_dim: int = 300  # word vector size (Sec. III-B)
    alpha: float = 9.0  # α, inverse temperature of the attention softmax (Eq. 8, 13)
    gate: bool = True  # gated feature update (Eq. 9–11, 14–16); False = "without gate" ablation SAM-6
    sim_norm: str = "query"  # axis of Eq. 6: query = the attending side (mirror of Eq. 6 in t2i), regions = Eq. 6 verbatim
    margin: float = 0.2  # β of Eq. 18
    tile_elements: int = 1 << 26  # floats in the largest temporary of a scoring tile (memory and speed only)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.sim_norm not in SIM_NORMS:
            raise ValueError(f"sim_norm must be one of {SIM_NORMS}, got {self.sim_norm!r}")
        for name in ("embed_dim", "word_dim", "tile_elements"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


def grid_cells(grid: torch.Tensor) -> torch.Tensor:
    """(n, C, H, W) map → (n, H·W, C) cell features, row-major over the grid."""
    return grid.flatten(2).transpose(1, 2)


def attention_weights(sims: torch.Tensor, valid: torch.Tensor, alpha: float, norm_dim: int,
                      masked_softmax: bool) -> torch.Tensor:
    """SAM attention (Eq. 6–8 / 13) over the last dimension of ``sims``.

    Args:
        sims: cosine similarities (Eq. 5), attended items along the last dimension.
        valid: bool mask broadcastable to ``sims``; invalid (padding) entries count as zero in the
            normalisation and, with ``masked_softmax``, get zero weight.
        alpha: inverse temperature α.
        norm_dim: the dimension Eq. 6 sums over.
        masked_softmax: mask invalid entries out of the softmax (they lie along the last dim).
    """
    clipped = sims.clamp(min=0) * valid  # Eq. 7, padding → 0
    normalised = clipped / torch.linalg.vector_norm(clipped, dim=norm_dim, keepdim=True).clamp(min=_NORM_EPS)  # Eq. 6
    logits = alpha * normalised
    if masked_softmax:
        logits = logits.masked_fill(~valid, float("-inf"))
    return logits.softmax(dim=-1)  # Eq. 8 / 13


def gated_update(own: torch.Tensor, gate_pre: torch.Tensor, cell_pre: torch.Tensor) -> torch.Tensor:
    """Eq. 10 / 15: ``(1 − g) x + g c`` with ``g = σ(gate_pre)`` and ``c = σ(cell_pre)`` (Eq. 11 / 16)."""
    # lerp needs one dtype; under autocast ``own`` may be float32 while the products are bf16
    return torch.lerp(own, torch.sigmoid(cell_pre).to(own.dtype), torch.sigmoid(gate_pre).to(own.dtype))


class SemanticAlignment(nn.Module):
    """SAM (Sec. III-C): attention, gated update and matching score of (image, caption) pairs.

    ``update_gate`` holds (W_1, b_1) of Eq. 11 — (W_3, b_3) of Eq. 16 in the t2i variant — and
    ``memory_cell`` holds (W_2, b_2) — (W_4, b_4). Both act on ``concat(own, attended)``: the first
    D input columns weigh the feature being updated, the last D the attended context.
    """

    def __init__(self, dim: int, variant: str, alpha: float, gate: bool, sim_norm: str, tile_elements: int) -> None:
        super().__init__()
        self.dim, self.variant, self.alpha, self.sim_norm = dim, variant, alpha, sim_norm
        self.tile_elements = tile_elements
        self.update_gate = nn.Linear(2 * dim, dim) if gate else None
        self.memory_cell = nn.Linear(2 * dim, dim) if gate else None

    # ------------------------------------------------------------------ gate halves

    def own_offsets(self, x: torch.Tensor) -> torch.Tensor | None:
        """``[0, x W_own(gate) + b_1, x W_own(cell) + b_2]`` (…, 3D): the own-feature half of Eq. 9 / 14.

        Laid out like :meth:`context_values` so that it is added to the attended values in the same
        matrix product; None without gate.
        """
        if self.update_gate is None:
            return None
        assert self.memory_cell is not None  # built together with update_gate
        d = self.dim
        weight = torch.cat([self.update_gate.weight[:, :d], self.memory_cell.weight[:, :d]])
        bias = torch.cat([self.update_gate.bias, self.memory_cell.bias])
        return F.pad(F.linear(x, weight, bias), (d, 0))

    def context_values(self, x: torch.Tensor) -> torch.Tensor:
        """What attention averages: ``[x, x W_ctx(gate), x W_ctx(cell)]`` (…, 3D), or just x without gate."""
        if self.update_gate is None:
            return x
        assert self.memory_cell is not None  # built together with update_gate
        d = self.dim
        weight = torch.cat([self.update_gate.weight[:, d:], self.memory_cell.weight[:, d:]])
        return torch.cat([x, F.linear(x, weight)], dim=-1)

    @staticmethod
    def _attend(weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
        """``offsets + weights @ values`` batched: (B, M, A) @ (B, A, W) (+ (M, W)) → (B, M, W)."""
        if offsets is None:
            return torch.bmm(weights, values)
        return torch.baddbmm(offsets.reshape(1, *weights.shape[1:2], -1), weights, values)

    def _update_and_score(self, own: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """cos(updated own feature, attended context) per item: the summand of Eq. 12 / 17.

        ``attended`` holds ``[e, l(W_1, b_1), l(W_2, b_2)]`` with the gate, just ``e`` without.
        """
        d = self.dim
        context = attended[..., :d]
        if self.update_gate is None:
            return row_cosine(own.expand_as(context), context)
        updated = gated_update(own, attended[..., d : 2 * d], attended[..., 2 * d :])  # Eq. 10–11 / 15–16
        return row_cosine(updated, context)

    # ------------------------------------------------------------------ tiles

    def _tile_i2t(self, regions: torch.Tensor, region_offsets: torch.Tensor | None, words: torch.Tensor,
                  word_values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Eq. 5–12 for b_i images × b_t captions: (b_i, b_t)."""
        b_i, k, _ = regions.shape
        b_t = words.shape[0]
        sims = torch.einsum("ikd,tnd->tikn", F.normalize(regions, dim=-1), F.normalize(words, dim=-1))  # Eq. 5
        norm_dim = -2  # Eq. 6: over the regions (the attending side) in both sim_norm settings
        weights = attention_weights(sims, valid[:, None, None, :], self.alpha, norm_dim, masked_softmax=True)
        attended = self._attend(weights.reshape(b_t, b_i * k, -1), word_values, region_offsets)  # Eq. 8, 9
        cosines = self._update_and_score(regions[None], attended.view(b_t, b_i, k, -1))  # (b_t, b_i, K)
        return cosines.mean(dim=-1).T  # Eq. 12

    def _tile_t2i(self, regions: torch.Tensor, region_values: torch.Tensor, words: torch.Tensor,
                  word_offsets: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
        """Eq. 13–17 for b_i images × b_t captions: (b_i, b_t)."""
        b_i = regions.shape[0]
        b_t, n, _ = words.shape
        sims = torch.einsum("ikd,tnd->itnk", F.normalize(regions, dim=-1), F.normalize(words, dim=-1))  # Eq. 5
        norm_dim = -2 if self.sim_norm == "query" else -1  # words (mirror of Eq. 6) or regions (verbatim)
        weights = attention_weights(sims, valid[None, :, :, None], self.alpha, norm_dim, masked_softmax=False)
        attended = self._attend(weights.reshape(b_i, b_t * n, -1), region_values, word_offsets)  # Eq. 13, 14
        cosines = self._update_and_score(words[None], attended.view(b_i, b_t, n, -1))  # (b_i, b_t, N)
        mask = valid[None].to(cosines.dtype)
        return (cosines * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # Eq. 17

    def _tile_shape(self, n_images: int, n_texts: int, cells: int, words: int) -> tuple[int, int]:
        """Images and captions per tile so that the largest temporary holds about ``tile_elements`` floats."""
        width = self.dim * (3 if self.update_gate is not None else 1)
        per_pair = (cells if self.variant == "i2t" else words) * width + cells * words
        pairs = max(1, self.tile_elements // per_pair)
        captions = min(n_texts, pairs)
        return min(n_images, max(1, pairs // captions)), captions

    def forward(self, regions: torch.Tensor, words: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """S(F, T) of every image of ``regions`` (n_i, K, D) and caption of ``words`` (n_t, N, D): (n_i, n_t).

        ``valid`` (n_t, N) marks real words. Pairs are scored in tiles; each pair's score depends
        on that pair only, so the result does not depend on the tiling or on the other items. The
        per-item halves of the gates are computed once: for all images (n_i × K × 3D floats, 200 MB
        for a block of 128 images at D = 2048) and per caption chunk.
        """
        n_i, k, _ = regions.shape
        n_t, n, _ = words.shape
        rows, cols = self._tile_shape(n_i, n_t, k, n)
        image_side: torch.Tensor | None
        text_side: Callable[[torch.Tensor], torch.Tensor | None]
        if self.variant == "i2t":
            image_side, text_side, tile = self.own_offsets(regions), self.context_values, cast(_Tile, self._tile_i2t)
        else:
            image_side, text_side, tile = self.context_values(regions), self.own_offsets, cast(_Tile, self._tile_t2i)
        out = regions.new_empty(n_i, n_t, dtype=torch.float32)  # float32 scores under bf16 autocast too
        for t0 in range(0, n_t, cols):
            t = slice(t0, t0 + cols)
            text_part = text_side(words[t])  # per caption chunk: bounded by the tile size
            for i0 in range(0, n_i, rows):
                i = slice(i0, i0 + rows)
                image_part = None if image_side is None else image_side[i]
                out[i, t] = tile(regions[i], image_part, words[t], text_part, valid[t])
        return out


@register_architecture("dsan", DsanConfig)
class DSAN(RetrievalModel):
    """DSAN over the cached 8 × 8 Inception-v3 grid (``map_mixed_7c``)."""

    image_inputs = (GRID_KEY,)

    def __init__(self, config: DsanConfig, feature_dims: dict[str, Any], vocab_size: int) -> None:
        super().__init__(config)
        maps = dict(feature_dims.get("maps") or {})
        if GRID_LEVEL not in maps:
            raise ConfigError(f"dsan reads the {GRID_LEVEL!r} grid: the feature spec must list '{GRID_LEVEL}:8' in maps "
                              f"(it has: {', '.join(maps) or 'none'})")
        channels = int(maps[GRID_LEVEL][0])
        d = config.embed_dim
        self.standardize = FeatureStandardizer({GRID_KEY: channels}, moments="float64")
        self.visual = nn.Linear(channels, d)  # grid cell → f_i (see "Visual projection")
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)  # y_i = W_y w_i
        self.gru = RecurrentTextEncoder(config.word_dim, d)  # Eq. 1–2
        self.sam = SemanticAlignment(d, config.variant, config.alpha, config.gate, config.sim_norm, config.tile_elements)

    @property
    def pairwise(self) -> bool:
        return True

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        """``regions``: (n, K, D) visual features f_1 .. f_K of every image."""
        cells = grid_cells(features[GRID_KEY].float())
        return {"regions": self.visual(self.standardize(GRID_KEY, cells))}

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Encoding:
        """``words``: (n, L, D) word features t_j (Eq. 3), L the chunk's longest caption, zero past each
        caption; ``lengths``: (n,)."""
        embedded = self.word_embedding(tokens[:, : int(lengths.max())])
        words = self.gru.encode(embedded, lengths).words()  # Eq. 3
        return {"words": words, "lengths": lengths.to(words.device)}

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """SAM score S(F, T) (Eq. 12 or 17) of every image against every caption: (n_images, n_texts)."""
        lengths = texts["lengths"]
        longest = max(int(lengths.max()), 1) if lengths.numel() else 1
        words = texts["words"][:, :longest]
        return self.sam(images["regions"], words, length_mask(lengths, longest))

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Eq. 18: hinge on the hardest in-batch negative caption and image of every positive pair."""
        sims = self.similarity(images, texts)
        loss = triplet_ranking_loss(sims, self.non_negatives(image_ids, caption_ids), self.config.margin, reduction="hardest")
        positive = sims.diagonal().detach().mean()
        return {"loss": loss, "positive": positive}
