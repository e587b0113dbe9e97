"""AMFMN: Asymmetric Multimodal Feature Matching Network (Yuan et al.; equations cited from the paper).

Image side: the global feature v^(g) of a frozen ResNet-18 (Eq. 5) and its multiscale maps
(Eq. 6–9) enter Multiscale Visual Self-Attention (MVSA, Eq. 14–19), whose spatially gated
features become a sigmoid mask over v^(g); the masked global feature is F_v.
Text side: word embeddings → bidirectional GRU, mean of the averaged directions (Eq. 10–12) gives
the sentence feature s^(g); keywords share the word embedding and go through their own GRU and an
MLP (Eq. 13) to give k^(g). Visual-Guided Multimodal Fusion (VGMF) guides each text feature with
F_v through one of three Visual-Guided Attentions (VGA: soft, Eq. 20; fusion, Eq. 21–22;
similarity, Eq. 23–25) and fuses sentence and keywords with a dynamic gate (Eq. 26–27) into F_t.
The score of a pair is cos(F_v, F_t); training uses the triplet loss whose margin shrinks with the
prior text similarity of the pair (Eq. 29–30, :mod:`rsitr.text_similarity`).

Because F_t depends on the candidate image, AMFMN is a *pairwise* model (``attention="none"`` makes
it separable): ``similarity`` evaluates every (image, caption) pair, tile by tile, and a pair's
score depends on that pair only.

Choices where the paper is silent or ambiguous (each is a config field where it matters):

* **Frozen backbone.** The paper fine-tunes ResNet-18; here the backbone is frozen and its outputs
  are cached (``rsitr.features``), so only the heads train. Cached features are standardised per
  channel with training-split statistics (``layers.FeatureStandardizer``, buffers in the checkpoint).
* **Which layers.** Eq. 6–9 speak of five CNN layers, the first three upsampled into the low-level
  features and the last two into the high-level ones. The cache holds the four ResNet stages, and
  we split them two and two: low level = layer1 + layer2 (stride 4 and 8: fine detail, small
  objects), high level = layer3 + layer4 (stride 16 and 32). Instead of upsampling to the largest
  map, the cache pools each stage to the common size of its group (``features.maps`` in the YAML:
  low 16 × 16, high 8 × 8; 192 KiB per image in float16), which keeps the cache small.
* **MVSA.** Eq. 14's 3 × 3 convolution downsamples the low-level map to the high-level size with
  stride low_size / high_size and padding 1. "Mean(v^(h))" of Eq. 16 is the mean over the channels
  of the (standardised) high-level input at every position, added to every channel of the joint
  map. The "L_2 regularization" of Eq. 17–18 is an L2 normalisation of each position's channel
  vector. No normalisation layer uses batch statistics (the paper names none), so an image's
  encoding never depends on its batch. The two 1 × 1 convolutions of Eq. 17–18 output
  ``mask_channels`` = 1 channel: v^(w) is then one spatial gate per position, which is the salient
  mask drawn in Fig. 10 (:meth:`AMFMN.salient_mask`). "Stretching" v̂^(i) is flattening it, and
  the "sigmoid gate function" that turns it into the mask of v^(g) is a linear layer (h·w → d)
  followed by a sigmoid. v^(g) is the pooled layer4 feature projected to d by a linear layer.
* **Keywords branch.** The pipeline gives a caption's keyword phrases as one padded word sequence
  (dataset keywords when the dataset has them, otherwise the sentence's content words, as the paper
  does for sentence-only datasets). Only the word embedding is shared with the sentence (Eq. 13); the
  keywords have their own BiGRU; k_n are its per-word states (mean of both directions) and the MLP
  of Eq. 13 is Linear → ReLU → Linear.
* **One VGA module** (the paper speaks of "the VGA module") guides both the sentence and the
  keyword feature. Its visual input v is F_v.
* **Similarity attention.** Eq. 25 gates f^(t) with σ(S(f^(v), f^(t))). With S the cosine, the gate
  is one positive number per pair, and since the score is the cosine of F_v and F_t it cancels out
  whenever only one text branch is used: "sim" would then be no guidance at all. The default
  ``sim_measure="elementwise"`` reads S(x, y) as the per-dimension terms x ⊙ y of the dot product,
  a per-dimension gate (the authors' public implementation does the same); ``"cosine"`` is the
  literal reading.
* **Dynamic fusion.** Eq. 27 mixes the L2-normalised s^(v) and k^(v) that Eq. 26 builds the gate
  from (its "s^(k)" is k^(v)), so σ(s^(w)) is a true mixing proportion between unit vectors.
  ``fusion_gate=False`` replaces the gate by the plain mean (Table VI m8).
* **Text modes** (Table IV, Table VI): ``text_mode="sentence"`` gives F_t = s^(v) (m6),
  ``"keywords"`` F_t = k^(v) (m7), ``"both"`` the fusion of Eq. 26–27 (m9, the full model and the
  default). ``attention="none"`` drops the VGA (F_t from s^(g), k^(g): m3–m5) and ``mvsa=False``
  uses the projected global feature as F_v (m1, m2).
* **Missing keywords.** When ``encode_text`` gets no keyword inputs, ``"both"`` falls back to the
  sentence alone (F_t = s^(v)); ``"keywords"`` feeds the sentence's words to the keyword branch,
  the only text branch it has (the mirror of the paper's "keywords into the sentence branch").
* **Dynamic margin.** The margin of the entry (image i, caption j) of the batch is
  α = γ (e^β − e^{β S}) / (e^β − 1) with S = S(T_j, T_{I_i}) the prior similarity of caption j and
  the training captions of image i (Eq. 29); the same α serves both directions of Eq. 30, since
  both compare that pair with the positive. The prior (BLEU and METEOR, weights and settings in
  :mod:`rsitr.text_similarity`) is built by :meth:`AMFMN.prepare_training` from the training
  captions only and is not saved with the model. Without it (``prepare_training`` never called,
  no ``caption_ids``, or ``dynamic_margin=False``) every margin is γ, the fixed-margin triplet
  loss of Eq. 28 that Eq. 29 reduces to at S = 0.
* **Loss reduction.** Eq. 30 sums the hinge over the negatives of each positive pair (its "h"
  subscript could also mean the hardest negative: ``loss_reduction="hardest"``); we average over
  the positive pairs of the batch. Captions of the same image are not negatives.
* **Sizes.** The visual embedding and the GRU hidden size are both ``embed_dim`` (512 in the paper);
  the multiscale channel count (256) is not given by the paper.

Cost. Every VGA variant costs O(d) per (image, caption) pair (its linear maps act on each side once),
but the gate of Eq. 26 is a 2d → d linear map of pair-dependent vectors, about 2d² multiply-adds per
pair (0.5 M at d = 512); with ``text_mode="both"`` it dominates scoring and training time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rsitr.errors import ConfigError
from rsitr.losses import triplet_ranking_loss
from rsitr.models.base import Encoding, RetrievalModel, TrainingCorpus
from rsitr.models.layers import FeatureStandardizer, RecurrentTextEncoder, cosine_matrix, full_precision
from rsitr.models.registry import register_architecture

TEXT_MODES = ("sentence", "keywords", "both")
ATTENTIONS = ("soft", "fusion", "sim", "none")
SIM_MEASURES = ("elementwise", "cosine")
LOSS_REDUCTIONS = ("sum", "hardest")
#: ResNet stages forming the low- and high-level multiscale features (see the module doc).
LOW_LEVELS = ("layer1", "layer2")
HIGH_LEVELS = ("layer3", "layer4")
MAP_PREFIX = "map_"

#: Prior similarity provider: (caption ids (B,), image ids (M,)) → (B, M) array of S in [0, 1].
PriorFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class AmfmnConfig:
    """Hyper-parameters of AMFMN; defaults are the paper's (Sec. V-B, Table V) where it gives them."""

    embed_dim: int = 512  # d: visual embedding and BiGRU hidden size (Sec. V-B: 512 both)
    word_dim: int = 300  # word vectors (Sec. V-B: 300)
    multiscale_channels: int = 256  # channels of each transformed map of Eq. 14–15 (not stated)
    mask_channels: int = 1  # output channels of the 1×1 convolutions of Eq. 17–18 (1: one spatial mask)
    mvsa: bool = True  # False: F_v is the projected global feature v^(g) (Table VI m1, m2)
    attention: str = "sim"  # VGA variant: soft (Eq. 20) | fusion (Eq. 21–22) | sim (Eq. 23–25) | none (m3–m5)
    sim_measure: str = "elementwise"  # S of Eq. 25: elementwise (per-dimension gate) | cosine (one gate per pair)
    text_mode: str = "both"  # sentence (m6) | keywords (m7) | both (m9, dynamic fusion Eq. 26–27) (Table IV)
    fusion_gate: bool = True  # False: plain mean of s^(v) and k^(v) instead of Eq. 26–27 (Table VI m8)
    dynamic_margin: bool = True  # Eq. 29–30; False: fixed margin γ (Eq. 28)
    gamma: float = 0.6  # γ of Eq. 29, the largest margin (Table V: 0.6 with β = 5 is the reported model)
    beta: float = 5.0  # β of Eq. 29, the decay coefficient (Table V)
    prior_bleu_weight: float = 0.5  # weight of BLEU in the prior S(T, T_I); METEOR gets the rest
    loss_reduction: str = "sum"  # hinge over all negatives (Eq. 30) | hardest negative only
    pair_block: int = 8192  # pairs per scoring tile (speed and memory only; scores do not depend on it)

    def __post_init__(self) -> None:
        for name, allowed in (("text_mode", TEXT_MODES), ("attention", ATTENTIONS),
                              ("sim_measure", SIM_MEASURES), ("loss_reduction", LOSS_REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.gamma > 0.0:  # also rejects NaN
            raise ValueError(f"gamma (the largest margin) must be positive, got {self.gamma}")
        if not 0.0 <= self.prior_bleu_weight <= 1.0:
            raise ValueError(f"prior_bleu_weight must lie in [0, 1], got {self.prior_bleu_weight}")
        for name in ("embed_dim", "word_dim", "multiscale_channels", "mask_channels", "pair_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------ margin


def dynamic_margin(prior: torch.Tensor, gamma: float, beta: float) -> torch.Tensor:
    """α_ct of Eq. 29: ``γ (e^β − e^{βS}) / (e^β − 1)``; γ at S = 0, 0 at S = 1 (γ(1 − S) as β → 0)."""
    if abs(beta) < 1e-8:
        return gamma * (1.0 - prior)
    return gamma * (math.expm1(beta) - torch.expm1(beta * prior)) / math.expm1(beta)


# ---------------------------------------------------------------------------------- image side


class MVSA(nn.Module):
    """Multiscale Visual Self-Attention (Eq. 14–19) and the salient mask it puts on v^(g)."""

    def __init__(self, low_channels: int, high_channels: int, stride: int, high_size: int,
                 channels: int, mask_channels: int, dim: int) -> None:
        super().__init__()
        self.low_conv = nn.Conv2d(low_channels, channels, kernel_size=3, stride=stride, padding=1)  # Eq. 14
        self.low_act = nn.PReLU()
        self.high_conv = nn.Conv2d(high_channels, channels, kernel_size=1)  # Eq. 15
        self.high_act = nn.PReLU()
        self.information = nn.Conv2d(2 * channels, mask_channels, kernel_size=1)  # Eq. 17
        self.gate = nn.Conv2d(2 * channels, mask_channels, kernel_size=1)  # Eq. 18
        self.to_mask = nn.Linear(mask_channels * high_size * high_size, dim)  # stretched v̂^(i) → mask of v^(g)

    def spatial(self, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v̂^(i), v^(w)): the gated information map (Eq. 19) and its spatial gate (Eq. 18)."""
        low_t = self.low_act(self.low_conv(low))  # Eq. 14
        high_t = self.high_act(self.high_conv(high))  # Eq. 15
        joint = high.mean(dim=1, keepdim=True) + torch.cat([low_t, high_t], dim=1)  # Eq. 16
        joint = F.normalize(joint, dim=1)  # L2 of every position's channel vector
        gate = torch.sigmoid(self.gate(joint))  # Eq. 18
        return self.information(joint) * gate, gate  # Eq. 17, 19

    def forward(self, low: torch.Tensor, high: torch.Tensor, global_feature: torch.Tensor) -> torch.Tensor:
        """F_v = v^(g) ⊙ σ(linear(stretched v̂^(i)))."""
        gated, _ = self.spatial(low, high)
        return global_feature * torch.sigmoid(self.to_mask(gated.flatten(1)))


# ----------------------------------------------------------------------------------- text side


class MLP(nn.Module):
    """Linear → ReLU → Linear (the MLP of Eq. 13)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


# ----------------------------------------------------------------------------------------- VGMF


def _split_linear(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer(Cat(x_i, y_j)) = W_x x_i + b`` plus ``W_y y_j``, returned as the two separate parts."""
    width = x.shape[-1]
    return F.linear(x, layer.weight[:, :width], layer.bias), F.linear(y, layer.weight[:, width:])


class VisualGuidedAttention(nn.Module):
    """VGA: the text feature t guided by the visual feature v, for every (image, text) pair.

    ``forward(v (n_i, d), t (n_t, d)) -> (n_i, n_t, d)``; the linear layers on Cat(v, t) of the
    fusion variant are applied to each side separately, which is the same map without forming the
    (n_i · n_t, 2d) concatenation.
    """

    def __init__(self, kind: str, dim: int, sim_measure: str = "elementwise") -> None:
        super().__init__()
        self.kind, self.sim_measure = kind, sim_measure
        if kind == "soft":
            self.gate = nn.Linear(dim, dim)  # Eq. 20
        elif kind == "fusion":
            self.value = nn.Linear(2 * dim, dim)  # Eq. 22, information
            self.gate = nn.Linear(2 * dim, dim)  # Eq. 22, gate
        elif kind == "sim":
            self.visual = nn.Linear(dim, dim)  # Eq. 23
            self.text = nn.Linear(dim, dim)  # Eq. 24
        else:
            raise ValueError(f"unknown VGA kind {kind!r}; use soft, fusion or sim")

    def forward(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "soft":
            return torch.sigmoid(self.gate(v))[:, None, :] * t[None, :, :]  # Eq. 20
        if self.kind == "fusion":
            value_v, value_t = _split_linear(self.value, v, t)
            gate_v, gate_t = _split_linear(self.gate, v, t)
            return (value_v[:, None] + value_t[None]) * torch.sigmoid(gate_v[:, None] + gate_t[None])  # Eq. 21–22
        f_v, f_t = self.visual(v), self.text(t)  # Eq. 23–24
        if self.sim_measure == "cosine":
            gate = torch.sigmoid(cosine_matrix(f_v, f_t))[..., None]
        else:
            gate = torch.sigmoid(f_v[:, None, :] * f_t[None, :, :])
        return gate * f_t[None, :, :]  # Eq. 25


class DynamicFusion(nn.Module):
    """F_t from the guided sentence and keyword features (Eq. 26–27), or their mean without the gate."""

    def __init__(self, dim: int, gated: bool = True) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim) if gated else None  # Eq. 26

    def forward(self, sentence: torch.Tensor, keywords: torch.Tensor) -> torch.Tensor:
        s, k = F.normalize(sentence, dim=-1), F.normalize(keywords, dim=-1)
        if self.gate is None:
            return (s + k) / 2
        part_s, part_k = _split_linear(self.gate, s, k)
        weight = torch.sigmoid(part_s + part_k)  # σ(s^(w))
        return weight * s + (1 - weight) * k  # Eq. 27


# ---------------------------------------------------------------------------------------- model


def _check_maps(feature_dims: dict[str, Any]) -> tuple[list[int], list[int], int, int]:
    """Channels of the low- and high-level maps and their two sizes; ConfigError if they do not fit."""
    maps = dict(feature_dims.get("maps") or {})
    needed = [level for level in (*LOW_LEVELS, *HIGH_LEVELS) if level not in maps]
    if needed:
        raise ConfigError(f"amfmn needs the feature maps {', '.join(needed)}; list them under features: maps: in the "
                          f"model YAML, e.g. [\"layer1:16\", \"layer2:16\", \"layer3:8\", \"layer4:8\"]")
    low_sizes = {int(maps[level][1]) for level in LOW_LEVELS}
    high_sizes = {int(maps[level][1]) for level in HIGH_LEVELS}
    if len(low_sizes) != 1 or len(high_sizes) != 1:
        raise ConfigError(f"amfmn: maps {LOW_LEVELS} must share one size and maps {HIGH_LEVELS} another, got {maps}")
    low_size, high_size = low_sizes.pop(), high_sizes.pop()
    if low_size % high_size:
        raise ConfigError(f"amfmn: the low-level map size {low_size} must be a multiple of the high-level size {high_size}")
    return ([int(maps[level][0]) for level in LOW_LEVELS], [int(maps[level][0]) for level in HIGH_LEVELS],
            low_size, high_size)


@register_architecture("amfmn", AmfmnConfig)
class AMFMN(RetrievalModel):
    """AMFMN over cached ResNet features: ``level4`` (v^(g)) and the maps ``map_layer1`` .. ``map_layer4``."""

    image_inputs = ("level4", *(MAP_PREFIX + level for level in (*LOW_LEVELS, *HIGH_LEVELS)))
    scene_embedding = "visual"  # F_v, the fused visual embedding (or v^(g) without MVSA)
    text_inputs = ("keywords",)

    def __init__(self, config: AmfmnConfig, feature_dims: dict[str, Any], vocab_size: int) -> None:
        super().__init__(config)
        d = config.embed_dim
        global_channels = int(feature_dims["level_channels"][3])
        standardized = {"level4": global_channels}
        self.global_fc = nn.Linear(global_channels, d)  # v^(g) → d
        self.mvsa: MVSA | None = None
        if config.mvsa:
            low, high, low_size, high_size = _check_maps(feature_dims)
            standardized.update({MAP_PREFIX + lvl: c for lvl, c in zip((*LOW_LEVELS, *HIGH_LEVELS), (*low, *high), strict=True)})
            self.mvsa = MVSA(sum(low), sum(high), low_size // high_size, high_size,
                             config.multiscale_channels, config.mask_channels, d)
        self.standardize = FeatureStandardizer(standardized)
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        uses_sentence = config.text_mode in ("sentence", "both")
        uses_keywords = config.text_mode in ("keywords", "both")
        self.sentence_gru = RecurrentTextEncoder(config.word_dim, d) if uses_sentence else None
        self.keyword_gru = RecurrentTextEncoder(config.word_dim, d) if uses_keywords else None
        self.keyword_mlp = MLP(d) if uses_keywords else None  # Eq. 13
        self.vga = None if config.attention == "none" else VisualGuidedAttention(config.attention, d, config.sim_measure)
        self.fusion = DynamicFusion(d, config.fusion_gate) if config.text_mode == "both" else None
        #: prior similarity of (caption, image) pairs for the dynamic margin; set by prepare_training,
        #: a plain attribute (training only, never saved).
        self.prior: PriorFn | None = None

    @property
    def pairwise(self) -> bool:
        return self.vga is not None

    # ------------------------------------------------------------------------------------ image

    def _multiscale(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised low- and high-level maps, concatenated over channels (Eq. 8–9)."""
        def group(levels: Sequence[str]) -> torch.Tensor:
            return torch.cat([self.standardize(MAP_PREFIX + lvl, features[MAP_PREFIX + lvl]) for lvl in levels], dim=1)
        return group(LOW_LEVELS), group(HIGH_LEVELS)

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        global_feature = self.global_fc(self.standardize("level4", features["level4"]))  # v^(g)
        if self.mvsa is None:
            return {"visual": global_feature}
        low, high = self._multiscale(features)
        return {"visual": self.mvsa(low, high, global_feature)}  # F_v

    @torch.no_grad()
    def salient_mask(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n, h, w) spatial gate v^(w) of MVSA (Eq. 18), in (0, 1): the salient mask of Fig. 10."""
        if self.mvsa is None:
            raise ValueError("this AMFMN has no MVSA module (mvsa=False), hence no salient mask")
        _, gate = self.mvsa.spatial(*self._multiscale(features))
        return gate.mean(dim=1)

    # ------------------------------------------------------------------------------------- text

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, keyword_tokens: torch.Tensor | None = None,
                    keyword_lengths: torch.Tensor | None = None, **extras: torch.Tensor) -> Encoding:
        """``sentence`` s^(g) and/or ``keywords`` k^(g), (n, d) each, as ``text_mode`` asks.

        Without keyword inputs, ``"both"`` returns the sentence only (scored as sentence-only) and
        ``"keywords"`` reads the sentence's words with the keyword branch.
        """
        out: Encoding = {}
        if self.sentence_gru is not None:
            out["sentence"] = self.sentence_gru.encode(self.word_embedding(tokens), lengths).mean()  # Eq. 10–12
        if self.keyword_gru is not None and self.keyword_mlp is not None:
            have_keywords = keyword_tokens is not None and keyword_lengths is not None
            if have_keywords or self.sentence_gru is None:
                words, counts = (keyword_tokens, keyword_lengths) if have_keywords else (tokens, lengths)
                assert words is not None and counts is not None  # have_keywords: neither keyword input is None
                states = self.keyword_gru.encode(self.word_embedding(words), counts).mean()
                out["keywords"] = self.keyword_mlp(states)  # Eq. 13
        return out

    # ------------------------------------------------------------------------------- similarity

    def _text_feature(self, sentence: torch.Tensor | None, keywords: torch.Tensor | None) -> torch.Tensor:
        """F_t from whichever text features are present (guided or not; any leading dimensions)."""
        if sentence is not None and keywords is not None and self.fusion is not None:
            return self.fusion(sentence, keywords)
        present = sentence if sentence is not None else keywords
        if present is None:
            raise ValueError("text encoding holds neither a sentence nor a keyword feature")
        return present

    def _score_tile(self, visual: torch.Tensor, texts: Encoding) -> torch.Tensor:
        """cos(F_v_i, F_t_ij) for one tile of images × texts: (n_i, n_t)."""
        assert self.vga is not None
        guided = {key: self.vga(visual, value) for key, value in texts.items()}  # s^(v), k^(v)
        text = self._text_feature(guided.get("sentence"), guided.get("keywords"))
        with full_precision():  # summed in float32 under bf16 autocast (see layers.full_precision)
            return (F.normalize(text, dim=-1) * F.normalize(visual, dim=-1)[:, None, :]).sum(-1, dtype=torch.float32)

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        visual = images["visual"]
        parts = {key: texts[key] for key in ("sentence", "keywords") if key in texts}
        if not parts:
            raise ValueError("text encoding holds neither a sentence nor a keyword feature")
        if self.vga is None:
            return cosine_matrix(visual, self._text_feature(parts.get("sentence"), parts.get("keywords")))
        n_texts = next(iter(parts.values())).shape[0]
        cols = max(1, min(n_texts, 256))
        rows = max(1, self.config.pair_block // cols)
        blocks = []
        for i in range(0, visual.shape[0], rows):
            row = [self._score_tile(visual[i : i + rows], {k: v[j : j + cols] for k, v in parts.items()})
                   for j in range(0, n_texts, cols)]
            blocks.append(torch.cat(row, dim=1))
        return torch.cat(blocks, dim=0)

    # ----------------------------------------------------------------------------------- training

    def prepare_training(self, corpus: TrainingCorpus) -> None:
        """Build the prior text similarity of the dynamic margin from the training captions only."""
        if not self.config.dynamic_margin:
            self.prior = None
            return
        from rsitr.text_similarity import PriorSimilarity

        self.prior = PriorSimilarity(corpus.captions, corpus.caption_image, corpus.train_caption_ids,
                                     bleu_weight=self.config.prior_bleu_weight)

    def pair_margins(self, image_ids: torch.Tensor, caption_ids: torch.Tensor | None) -> torch.Tensor:
        """(B, B) margins: entry (i, j) is α_ct of caption j against image i (Eq. 29), or γ without a prior."""
        size = (len(image_ids), len(image_ids))
        if self.prior is None or caption_ids is None or not self.config.dynamic_margin:
            return torch.full(size, float(self.config.gamma))
        scores = self.prior(caption_ids.detach().cpu().numpy(), image_ids.detach().cpu().numpy())  # (B captions, B images)
        prior = torch.as_tensor(np.asarray(scores, dtype=np.float32)).T  # rows: images, columns: captions
        return dynamic_margin(prior.clamp(0.0, 1.0), self.config.gamma, self.config.beta)

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Eq. 30 on the batch's B × B scores with the per-pair margins of Eq. 29; ``margin`` is their mean."""
        sims = self.similarity(images, texts)
        same = self.non_negatives(image_ids.to(sims.device), caption_ids)
        margins = self.pair_margins(image_ids, caption_ids).to(sims.device)
        loss = triplet_ranking_loss(sims, same, margins, self.config.loss_reduction)
        negatives = ~same
        mean_margin = margins[negatives].mean() if negatives.any() else margins.new_tensor(float(self.config.gamma))
        return {"loss": loss, "margin": mean_margin.detach()}


# ------------------------------------------------------------------------------------------ plot
