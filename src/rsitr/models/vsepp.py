"""VSE++: visual-semantic embeddings with hard negatives (Faghri, Fleet, Kiros, Fidler, BMVC 2018).

VSE++ is the separable baseline of this package: an image and a caption are embedded
independently into a joint space and scored by cosine similarity.

* **Image** (Sec. 3, f(i) = W_f^T φ(i)): φ(i) is the global feature of the frozen CNN, here the
  pooled output of the last ResNet stage (``level4``, 2048 channels for ResNet-50; the paper's
  ResNet feature is the pooled final layer of a ResNet-152), standardised per channel, then one
  linear layer W_f to the joint space and L2 normalisation. Only this one feature is read.
* **Caption** (Sec. 3, g(c) = W_g^T ψ(c)): word embeddings → unidirectional GRU; ψ(c) is the
  hidden state after the last true word of the caption, L2-normalised. The GRU width is the joint
  size, so W_g is folded into the GRU as in the authors' setup.
* **Score**: s(i, c) = f(i) · g(c), the cosine of the two unit vectors.
* **Loss** (Sec. 3.1): the max-of-hinges loss ℓ_MH, i.e. the bidirectional triplet loss that keeps
  only the hardest negative caption of each image and the hardest negative image of each caption,
  margin α = 0.2. ``hardest_negative=False`` gives the sum-of-hinges loss ℓ_SH of VSE0.

Choices where the paper is silent or where this package differs (config fields where it matters):

* **Frozen, precomputed features.** The model never sees pixels; VSE++'s fine-tuned (FT) and
  random-crop (RC) variants are out of scope. This is the paper's precomputed-feature setting
  with a ResNet backbone.
* **Bidirectional GRU** (``bidirectional``, default False as in VSE++): when enabled, the two
  directions are averaged, both per word and for the final state (forward state after the last
  word, backward state after the first word), so the width stays ``embed_dim``.
* **Two shipped configs.** ``vsepp`` is VSE++ as its paper describes it (the fields above at
  their defaults, 1024-d). DOVE Table I re-implements VSE++ "with the same image encoder and text
  encoder as our model" (DOVE Sec. IV-D); ``vsepp-dove-encoders`` comes as close to that as this
  model can: d = 512, bidirectional GRU, ``text_pooling="mean"`` (then the caption is DOVE's T_G
  without DTGA, Table III's "w/o DTGA"). It keeps the single pooled ``level4`` feature, where
  DOVE's image encoder is the four-stage MSV (Eq. 1) with RoI regions (Eq. 2) and IFA, and has no
  DTGA; DOVE Table I does not say which of its parts the re-implementation used.
* **Pooling** (``text_pooling``): ``"last"`` is VSE++'s final hidden state at the true length
  (read from the packed GRU, so padding never enters); ``"mean"`` averages the per-word outputs
  over the true length instead.
* **Initialisation**: the image projection is Xavier-uniform with zero bias and the word table is
  uniform in [-0.1, 0.1] (padding row zero), as in the authors' released setup; GloVe vectors,
  when configured, replace the word table.
* **Loss reduction**: hinges are averaged over the positive pairs of a batch (the paper sums
  them), so the learning rate does not depend on the batch size; captions of the same image are
  never negatives of each other.
* Training settings of the paper (Adam, lr 2e-4 for 15 epochs then 2e-5 for 15, batch 128;
  ``reference.train`` of ``vsepp.yaml``) belong to the run configuration, not to the model. The
  gradient-norm clipping at 2 is in the authors' released training script (``--grad_clip``), not
  in the paper's text; the trainer's ``train.grad_clip`` (see ``docs/models.md``) plays its role.
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
    cosine_matrix,
    init_projection,
    init_word_embedding,
)
from rsitr.models.registry import register_architecture

TEXT_POOLINGS = ("last", "mean")


@dataclass
class VseppConfig:
    """Hyper-parameters of VSE++; defaults are the paper's (Sec. 4)."""

    embed_dim: int = 1024  # joint embedding size (also the GRU width)
    word_dim: int = 300  # word vector size
    gru_layers: int = 1  # stacked GRU layers (VSE++: 1)
    bidirectional: bool = False  # VSE++ uses a unidirectional GRU; True averages both directions
    text_pooling: str = "last"  # last = hidden state at the true length (VSE++) | mean over words
    margin: float = 0.2  # α of the triplet loss
    hardest_negative: bool = True  # True: max of hinges (VSE++); False: sum of hinges (VSE0)

    def __post_init__(self) -> None:
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.gru_layers < 1:
            raise ValueError(f"gru_layers must be at least 1, got {self.gru_layers}")


@register_architecture("vsepp", VseppConfig)
class VSEPP(RetrievalModel):
    """VSE++ over the cached global feature ``level4``: separable, cosine-scored."""

    image_inputs = ("level4",)
    first_stage = ("embedding", "embedding")  # the score is the cosine of these embeddings
    scene_embedding = "embedding"

    def __init__(self, config: VseppConfig, feature_dims: dict[str, Any], vocab_size: int) -> None:
        super().__init__(config)
        global_channels = int(feature_dims["level_channels"][3])
        self.standardize = FeatureStandardizer({"level4": global_channels})
        self.image_fc = nn.Linear(global_channels, config.embed_dim)  # W_f
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        self.gru = RecurrentTextEncoder(config.word_dim, config.embed_dim, config.gru_layers, config.bidirectional)
        init_projection(self.image_fc)
        init_word_embedding(self.word_embedding)

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        """f(i): standardised global feature → linear → unit vector."""
        return {"embedding": F.normalize(self.image_fc(self.standardize("level4", features["level4"])), dim=-1)}

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Encoding:
        """g(c): GRU state at the true length (or mean over words) → unit vector."""
        states = self.gru.encode(self.word_embedding(tokens), lengths)
        sentence = states.mean() if self.config.text_pooling == "mean" else states.final
        return {"embedding": F.normalize(sentence, dim=-1)}

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        return cosine_matrix(images["embedding"], texts["embedding"])

    def ranking_loss(self, sims: torch.Tensor, image_ids: torch.Tensor,
                     caption_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ℓ_MH (or ℓ_SH) of a (B, B) score matrix whose diagonal holds the positive pairs."""
        reduction = "hardest" if self.config.hardest_negative else "sum"
        return triplet_ranking_loss(sims, self.non_negatives(image_ids, caption_ids), self.config.margin, reduction)

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"loss": self.ranking_loss(self.similarity(images, texts), image_ids, caption_ids)}
