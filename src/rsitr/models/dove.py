"""DOVE: Direction-Oriented Visual-semantic Embedding (Ma, Pan, Bai; equations cited from the paper).

Image side: multiscale visual features (MSV, Eq. 1) from the four stages of a frozen ResNet and
N_r region features from an RoI encoder (Eq. 2), fused by Intra-modal Fusion Attention
(IFA, Eq. 17–22) into the final visual embedding V_MR.
Text side: word embeddings → bidirectional GRU (Eq. 3–4) → Digging Text Genome Assistant
(DTGA, Eq. 12–16) → word-level features F_G, whose mean is T_G; Inter-modal Guidance Attention
(IGA, Eq. 23–28) then guides the text with the regional features of the candidate image to give
T_RG. The objective (Eq. 29–31) is the triplet loss on (V_MR, T_RG) plus λ_g times the same loss
on the global pair (V_M, T_G).

Choices where the paper is silent or ambiguous (each is a config field where it matters):

* **IGA is scored per pair.** Eq. 24–27 expand the means E_R, E_G to the text batch B_c and form
  ``S_RG = σ(F'_R F'_G^T)`` (B_c × B_c), which would mix the captions of a batch and make a
  caption's embedding depend on which other captions share its batch. We use the per-pair reading:
  for image i and caption j, ``s_ij = σ(r_i · g_j / √d)`` and ``F_{R⊕G} = s_ij g_j + r_i`` (Eq. 26–27
  restricted to one pair). Consequently T_RG depends on the candidate image and DOVE is a
  *pairwise* model: evaluation scores every (image, caption) pair and never uses the ground-truth
  pairing to build an embedding.
* **Score scaling.** Eq. 19 and 26 apply σ to raw dot products; at d = 512 these saturate the
  sigmoid at initialisation. ``score_scale=True`` (default) divides by √d as Eq. 11 does.
* **MLP** (Eq. 1, 16, 28) is Linear → ReLU → Linear with the residual the equations show; no
  normalisation layers, so nothing depends on batch statistics.
* **DTGA.** One gated self-attention per direction serves both Eq. 12 (attention features of the
  own direction) and Eq. 14 (input of the other direction's probability matrix), which keeps the
  module "lightweight" (two attention operations). ``F`` of Eq. 14 is Linear → ReLU → Linear →
  sigmoid, so that P is a gate in (0, 1) as "probability matrix" implies.
* **MSV projection.** Eq. 1 needs M_v in R^{N_m × d}; each stage's globally pooled map (256–2048
  channels) is mapped to d by its own linear layer before Eq. 1.
* **Padding.** Means over words (Eq. 23, 29) and over regions skip padded positions; padded
  regions get zero weight in S_MR.
* **Input standardisation.** The cached backbone features are standardised per channel with
  training-split statistics (``FeatureStandardizer``; buffers saved in the checkpoint) before
  Eq. 1 and 2; the paper's linear layers are unchanged.
* **Loss.** Eq. 30 sums the hinge over the negatives of each positive pair; we average over the
  positive pairs of the batch. Captions of the same image are not negatives.
* **Test-time score** (``test_score``). The paper never writes the retrieval score down; what it
  does say points to the final pair alone, ``S(V_MR, T_RG)`` with S the cosine of Eq. 30, which
  is the default ``test_score="final"``:

  - Sec. III-D introduces Eq. 29 "to obtain the final visual and textual embeddings" and derives
    V_MR and T_RG from F_MR (Eq. 22) and F_RG (Eq. 28); Eq. 31 calls L(V_MR, T_RG) "the final
    ranking loss" and L(V_M, T_G) "the global visual-semantic constraint", added "to ensure that
    the original visual and textual semantics remain unchanged" and serving "as an external
    constraint for the final visual and textual representations" (also Sec. I, fourth
    contribution). A constraint on the final embeddings is a training term, not a second score.
  - Sec. IV-F-2 (Fig. 9) measures d(V_MR, T_RG) as the distance between "the final visual
    embedding and the text embedding" and says V_M and T_G "serve as an external global
    visual-semantic constraint that holds the distance between the final visual and textual
    embeddings"; Fig. 10 plots the final embeddings as what is matched.
  - λ_g appears only in Eq. 31, and Sec. IV-C-1 / Fig. 6 explain its effect as the strength of the
    constraint ("the global visual-semantic constraint effect is enhanced"); no test-time weight
    of the global pair is given anywhere.

  The one phrase that could be read otherwise is Sec. I's "external constraint ... in similarity
  measurement", which names the part of Fig. 2 that holds both losses. ``"final+global"`` is the
  alternative reading, ``cos(V_MR, T_RG) + cos(V_M, T_G)``: the two cosines with weight 1, not
  λ_g. λ_g scales a loss gradient in Eq. 31 and was tuned for training (Fig. 6: 10); at test time
  it would put ten times the weight on the global cosine, ranking almost by V_M / T_G alone, and
  tie the ranking to the parameter the ``dove-lambda`` study varies. Both cosines lie in [-1, 1],
  so equal weights treat them as equal evidence. The training loss (Eq. 31) is the same in both
  settings; validation, which picks the checkpoint, ranks with the same score as the test. The
  global term is a cosine of two embeddings that each depend on one item, so the score stays
  pairwise-correct. The ``dove-test-score`` study compares the two settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rsitr.losses import triplet_ranking_loss
from rsitr.models.base import Encoding, RetrievalModel
from rsitr.models.layers import (
    FeatureStandardizer,
    GatedSelfAttention,
    RecurrentTextEncoder,
    ResidualMLP,
    cosine_matrix,
    full_precision,
    make_head,
    masked_mean,
)
from rsitr.models.registry import register_architecture

DTGA_INPUTS = ("fb", "ff", "bb", "mean", "none")
#: Rows per thread of one tile of IGA's evaluation path (``IGA._nonlinear_scores_fast``): each thread's
#: share of a buffer, 512 × d = 512 bf16 values, is 0.5 MiB and stays in its core's L2. Measured on one
#: thread (1024 captions, d = 512): 256 rows 0.64, 512 rows 0.74, 1024 rows 0.67 of the GEMM-only rate.
FAST_TILE_ROWS = 512
TEST_SCORES = ("final", "final+global")


@dataclass
class DoveConfig:
    """Hyper-parameters of DOVE; defaults are the paper's (Sec. IV-B)."""

    embed_dim: int = 512  # d, the joint embedding size (Table V: 512 best)
    word_dim: int = 300  # word vectors (GloVe size)
    attention_heads: int = 2  # heads of the gated self-attention in DTGA
    dtga: str = "fb"  # DTGA inputs: fb = (H^f, H^b), ff, bb, mean = both (H^f+H^b)/2; none = mean of directions, no DTGA (Table II/III)
    ifa: bool = True  # False replaces IFA by plain concatenation (Table III "w/o IFA")
    ifa_head: str = "linear"  # linear | nonlinear (Table IV)
    iga: bool = True  # False drops IGA: T_RG = T_G and the model becomes separable (Table III)
    iga_head: str = "nonlinear"  # linear | nonlinear (Table IV)
    score_scale: bool = True  # divide the σ scores of Eq. 19/26 by √d
    margin: float = 0.2  # α of Eq. 30
    lambda_g: float = 10.0  # λ_g of Eq. 31
    pair_block: int = 8192  # pairs per IGA tile (speed and memory only; results do not depend on it)
    test_score: str = "final"  # ranking score: final = cos(V_MR, T_RG) (Sec. III-D); final+global adds cos(V_M, T_G) with weight 1

    def __post_init__(self) -> None:
        if self.dtga not in DTGA_INPUTS:
            raise ValueError(f"dtga must be one of {DTGA_INPUTS}, got {self.dtga!r}")
        if self.test_score not in TEST_SCORES:
            raise ValueError(f"test_score must be one of {TEST_SCORES}, got {self.test_score!r}")
        for name in ("ifa_head", "iga_head"):
            if getattr(self, name) not in ("linear", "nonlinear"):
                raise ValueError(f"{name} must be 'linear' or 'nonlinear', got {getattr(self, name)!r}")


class MultiscaleVisual(nn.Module):
    """MSV encoder head: per-stage projection to d, then ``F_M = MLP(M_v) + M_v`` (Eq. 1)."""

    def __init__(self, level_channels: list[int], dim: int) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(c, dim) for c in level_channels)
        self.mlp = ResidualMLP(dim)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        m_v = torch.stack([proj(x) for proj, x in zip(self.projections, levels)], dim=1)
        return self.mlp(m_v)


class DTGA(nn.Module):
    """Digging Text Genome Assistant (Eq. 12–16) over the two GRU directions."""

    def __init__(self, dim: int, heads: int, inputs: str) -> None:
        super().__init__()
        self.inputs = inputs
        self.attend_first = GatedSelfAttention(dim, heads)
        self.attend_second = GatedSelfAttention(dim, heads)
        self.prob_first = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Sigmoid())
        self.prob_second = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.Sigmoid())
        self.decode = ResidualMLP(dim)

    def select_inputs(self, forward: torch.Tensor, backward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input pair of Table II."""
        if self.inputs == "fb":
            return forward, backward
        if self.inputs == "ff":
            return forward, forward
        if self.inputs == "bb":
            return backward, backward
        mean = (forward + backward) / 2
        return mean, mean

    def forward(self, forward: torch.Tensor, backward: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first, second = self.select_inputs(forward, backward)
        attended_first = self.attend_first(first, mask)  # Eq. 12
        attended_second = self.attend_second(second, mask)
        joint_first = attended_first + first  # Eq. 13
        joint_second = attended_second + second
        prob_second = self.prob_second(attended_second)  # Eq. 14
        prob_first = self.prob_first(attended_first)
        combined = joint_first * prob_second + joint_second * prob_first  # Eq. 15 and its mirror
        return self.decode(combined)  # Eq. 16


class IFA(nn.Module):
    """Intra-modal Fusion Attention (Eq. 17–22): multiscale and regional features activate each other."""

    def __init__(self, dim: int, head: str, score_scale: bool) -> None:
        super().__init__()
        self.multiscale = nn.Linear(dim, dim)  # Eq. 17
        self.regional = nn.Linear(dim, dim)  # Eq. 18
        self.head = make_head(head, dim)  # Eq. 22 (linear) or MLP + residual
        self.scale = 1.0 / math.sqrt(dim) if score_scale else 1.0

    def forward(self, f_m: torch.Tensor, f_r: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        fm = self.multiscale(f_m)
        fr = self.regional(f_r)
        scores = torch.sigmoid(fm @ fr.transpose(1, 2) * self.scale)  # Eq. 19, (n, N_m, N_r)
        scores = scores * region_mask[:, None, :].to(scores.dtype)
        r_into_m = scores @ fr + fm  # Eq. 20
        m_into_r = scores.transpose(1, 2) @ fm + fr  # Eq. 21
        return self.head(torch.cat([r_into_m, m_into_r], dim=1))  # Eq. 22


@dataclass
class _FastTerms:
    """Per-side terms of ``IGA._nonlinear_scores_fast`` (a_j = W1 g_j, b_i = W1 r_i + b1, c_i = r_i + b2, W2ᵀ)
    in the compute dtype, and s, g, V_MR in the accumulation dtype (float32, or float64 for float64
    inputs) of the last pass."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    w2t: torch.Tensor
    s: torch.Tensor
    s_acc: torch.Tensor
    g_acc: torch.Tensor
    v_acc: torch.Tensor


class IGA(nn.Module):
    """Inter-modal Guidance Attention (Eq. 23–28), evaluated for every (image, caption) pair."""

    def __init__(self, dim: int, head: str, score_scale: bool, pair_block: int) -> None:
        super().__init__()
        self.regional = nn.Linear(dim, dim)  # Eq. 24
        self.textual = nn.Linear(dim, dim)  # Eq. 25
        self.head_kind = head
        self.head = make_head(head, dim)  # Eq. 28
        self.scale = 1.0 / math.sqrt(dim) if score_scale else 1.0
        self.pair_block = pair_block

    def project(self, region_mean: torch.Tensor, text_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """F'_R = W_R E_R + b_R and F'_G = W_G E_G + b_G (Eq. 24–25), one row per image / caption."""
        return self.regional(region_mean), self.textual(text_mean)

    def gate(self, dots: torch.Tensor) -> torch.Tensor:
        """s = σ(F'_R · F'_G · scale) of Eq. 26 from the dot products (scale 1/√d with ``score_scale``)."""
        return torch.sigmoid(dots * self.scale)

    def aligned_texts(self, region_mean: torch.Tensor, text_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F'_R, T_RG) of aligned pairs: row k of the images guides row k of the captions.

        ``T_RG_k = head(s_k F'_G_k + F'_R_k)`` (Eq. 26–28 restricted to one pair): the explicit
        form that :meth:`pair_scores` expands, for speed, into the cosine of every pair (the
        tiles of ``_nonlinear_block`` / ``_nonlinear_scores_fast`` and the closed form of
        ``_linear_head_cosine``); the cosine of V_MR_k with it is the diagonal of :meth:`pair_scores`.
        """
        r, g = self.project(region_mean, text_mean)
        s = self.gate((r * g).sum(-1, keepdim=True))
        return r, self.head(s * g + r)

    def pair_scores(self, region_mean: torch.Tensor, text_mean: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """cos(V_MR_i, T_RG_ij) for all i, j: (n_images, n_texts), float32.

        The first linear layer of the head is applied to r and g separately (it is linear, so
        ``W(s g + r) = s Wg + Wr``), which leaves one d × d product per pair for the non-linear head.
        With gradients enabled (training, Eq. 31) the differentiable tiles of :meth:`_nonlinear_block`
        run; without (evaluation, search) the faster :meth:`_nonlinear_scores_fast`, which gives the
        same scores up to summation order.
        """
        r, g = self.project(region_mean, text_mean)  # F'_R (n_i, d), F'_G (n_t, d)
        s = self.gate(r @ g.T)  # Eq. 26, (n_i, n_t)
        if self.head_kind == "linear":
            return self._linear_head_cosine(r, g, s, visual)
        if torch.is_grad_enabled():
            return self._nonlinear_scores_differentiable(r, g, s, visual)
        return self._nonlinear_scores_fast(r, g, s, visual)

    def _nonlinear_scores_differentiable(self, r: torch.Tensor, g: torch.Tensor, s: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The training path: the scores in tiles of ``_nonlinear_block`` (differentiable)."""
        # Tiles of about pair_block pairs keep the (tile, d) temporaries cache-sized.
        cols = min(g.shape[0], 256)
        rows = max(1, self.pair_block // cols)
        out = s.new_empty(s.shape, dtype=torch.float32)
        for i in range(0, r.shape[0], rows):
            for j in range(0, g.shape[0], cols):
                out[i : i + rows, j : j + cols] = self._nonlinear_block(
                    r[i : i + rows], g[j : j + cols], s[i : i + rows, j : j + cols], visual[i : i + rows]
                )
        return out

    def _nonlinear_block(self, r: torch.Tensor, g: torch.Tensor, s: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The training tile (differentiable): the non-linear head's cosine for b images × n_t captions.

        t_ij = W2 relu(s_ij W1 g_j + W1 r_i + b1) + b2 + s_ij g_j + r_i   (Eq. 27–28)

        W2 is applied as one flat (b·n_t, d) × (d, d) product: its gradient is then one product as
        well, where a batched product over an expanded W2 would make autocast copy the weight b
        times and backward sum b weight gradients.
        """
        mlp: ResidualMLP = self.head  # type: ignore[assignment]
        w1_g = g @ mlp.fc1.weight.T  # (n_t, d)
        w1_r = r @ mlp.fc1.weight.T + mlp.fc1.bias  # (b, d)
        hidden = torch.addcmul(w1_r[:, None, :], s[..., None], w1_g[None]).relu_()  # (b, n_t, d)
        text = torch.addmm(mlp.fc2.bias, hidden.reshape(-1, hidden.shape[-1]), mlp.fc2.weight.T)
        text = text.view(hidden.shape).add_(r[:, None, :])  # W2 h + b2 + r_i
        text.addcmul_(s[..., None], g[None])  # + s_ij g_j
        # The cosine is summed in float32 (see layers.full_precision) without a float32 copy of
        # the (b, n_t, d) tile: under bf16 autocast the products stay bf16, the sums do not.
        with full_precision():
            dot = (text * visual[:, None, :].to(text.dtype)).sum(-1, dtype=torch.float32)
            norms = (torch.linalg.vector_norm(text, dim=-1, dtype=torch.float32)
                     * torch.linalg.vector_norm(visual, dim=-1, keepdim=True, dtype=torch.float32))
            return dot / norms.clamp(min=1e-12)

    @torch.no_grad()
    def _nonlinear_scores_fast(self, r: torch.Tensor, g: torch.Tensor, s: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """EVALUATION PATH (no autograd): the non-linear head's cosine at close to the matmul rate.

        Same pair terms as :meth:`_nonlinear_block` (Eq. 27–28), ``t_ij = W2 h_ij + c_i + s_ij g_j``
        with ``h_ij = relu(s_ij a_j + b_i)``, ``a_j = W1 g_j``, ``b_i = W1 r_i + b1`` and
        ``c_i = r_i + b2``, but laid out so that each tile is one flat ``(rows, d) × (d, d)`` GEMM:

        * a tile is one image against up to :attr:`fast_rows` captions (rows = captions), so
          ``c_i`` is the GEMM's bias (``addmm``, free) and ``t · v_i`` a float32 matrix-vector
          product; with fewer captions than images (a search query: one caption against every
          image) the roles swap (rows = images, ``c_i`` a bias matrix, a row-wise dot);
        * the h, W2 h and float32 t buffers are allocated once per call and reused by every tile,
          of :attr:`fast_rows` rows (cache-sized per thread);
        * under autocast the work runs in the autocast dtype explicitly, with autocast off: autocast
          would re-cast W2 on every product.

        Choice: the last pass converts ``W2 h + c_i`` (one rounding, as the training tile's ``addmm``
        output) to float32 before adding ``s_ij g_j``, so the dot product and the norm are float32
        sums of float32 terms: scores are never rounded to bf16 (see ``layers.full_precision``) and
        the bf16 error is at most the training tile's. The algebraic shortcut of taking ``t · v_i`` as
        an extra GEMM column (``h · W2ᵀ v_i``) was rejected: a bf16 GEMM rounds its output, and the
        score would then be bf16-rounded, so close candidates would tie. ``torch.compile`` of the
        element-wise passes (h, and the float32 tail fused into one read) was measured and not
        adopted: about 9 % less time per pair on one CPU thread, for about 35 s of compilation at
        start-up and a recompilation for every new tile length.
        """
        mlp: ResidualMLP = self.head  # type: ignore[assignment]
        device_type = r.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(r.dtype, mlp.fc2.weight.dtype)
        with torch.autocast(device_type, enabled=False):
            w1 = mlp.fc1.weight.to(dtype)
            a = g.to(dtype) @ w1.T  # W1 g_j, (n_t, d)
            b = torch.addmm(mlp.fc1.bias.to(dtype), r.to(dtype), w1.T)  # W1 r_i + b1, (n_i, d)
            c = (r.float() + mlp.fc2.bias.float()).to(dtype)  # r_i + b2, (n_i, d)
            w2t = mlp.fc2.weight.to(dtype).T
            acc = torch.promote_types(dtype, torch.float32)
            terms = _FastTerms(a=a, b=b, c=c, w2t=w2t, s=s.to(dtype), s_acc=s.to(acc), g_acc=g.to(acc), v_acc=visual.to(acc))
            captions_as_rows = g.shape[0] >= min(r.shape[0], self.fast_rows)
            scores, norms = (self._fast_image_tiles if captions_as_rows else self._fast_caption_tiles)(terms)
            v_norm = torch.linalg.vector_norm(terms.v_acc, dim=-1, keepdim=True)
            return scores.div_(norms.mul_(v_norm).clamp_(min=1e-12)).float()

    @property
    def fast_rows(self) -> int:
        """Rows (pairs) of one tile of the fast path: ``FAST_TILE_ROWS`` per torch thread, at most ``pair_block``.

        More threads split each tile's GEMM and passes, so the tile grows with them: each thread's
        part stays cache-sized while the fixed per-tile cost (about ten operator calls) shrinks.
        """
        return max(1, min(self.pair_block, FAST_TILE_ROWS * torch.get_num_threads()))

    @staticmethod
    def _fast_buffers(x: _FastTerms, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """h, W2 h and t buffers of ``rows`` × d, shared by all tiles (t is W2 h's own buffer when the compute
        dtype is already the accumulation dtype), and the (n_i, n_t) dot-product and norm matrices."""
        d = x.w2t.shape[1]
        hidden = torch.empty(rows, d, dtype=x.a.dtype, device=x.a.device)
        product = torch.empty_like(hidden)
        text = product if x.v_acc.dtype == x.a.dtype else torch.empty(rows, d, dtype=x.v_acc.dtype, device=x.a.device)
        dots = torch.empty(x.b.shape[0], x.a.shape[0], dtype=x.v_acc.dtype, device=x.a.device)
        return hidden, product, text, dots, torch.empty_like(dots)

    def _fast_image_tiles(self, x: _FastTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """(t·v, |t|) of every pair, one tile = one image × a run of captions (rows = captions)."""
        n_i, n_t = x.b.shape[0], x.a.shape[0]
        rows = max(1, min(n_t, self.fast_rows))
        hidden, product, text, dots, norms = self._fast_buffers(x, rows)
        for j in range(0, n_t, rows):
            m = min(rows, n_t - j)
            h, u, t = hidden[:m], product[:m], text[:m]
            a, g_acc = x.a[j : j + m], x.g_acc[j : j + m]
            for i in range(n_i):
                torch.addcmul(x.b[i], x.s[i, j : j + m, None], a, out=h).relu_()  # h_ij
                torch.addmm(x.c[i], h, x.w2t, out=u)  # W2 h_ij + c_i
                if t is not u:
                    t.copy_(u)
                t.addcmul_(x.s_acc[i, j : j + m, None], g_acc)  # + s_ij g_j
                torch.mv(t, x.v_acc[i], out=dots[i, j : j + m])
                torch.linalg.vector_norm(t, dim=-1, out=norms[i, j : j + m])
        return dots, norms

    def _fast_caption_tiles(self, x: _FastTerms) -> tuple[torch.Tensor, torch.Tensor]:
        """(t·v, |t|) of every pair, one tile = one caption × a run of images (rows = images; few captions)."""
        n_i, n_t = x.b.shape[0], x.a.shape[0]
        rows = max(1, min(n_i, self.fast_rows))
        hidden, product, text, dots, norms = self._fast_buffers(x, rows)
        for i in range(0, n_i, rows):
            m = min(rows, n_i - i)
            h, u, t = hidden[:m], product[:m], text[:m]
            b, c, v_acc = x.b[i : i + m], x.c[i : i + m], x.v_acc[i : i + m]
            for j in range(n_t):
                torch.addcmul(b, x.s[i : i + m, j, None], x.a[j], out=h).relu_()  # h_ij
                torch.addmm(c, h, x.w2t, out=u)  # W2 h_ij + c_i
                if t is not u:
                    t.copy_(u)
                t.addcmul_(x.s_acc[i : i + m, j, None], x.g_acc[j])  # + s_ij g_j
                dots[i : i + m, j] = torch.linalg.vecdot(t, v_acc)
                norms[i : i + m, j] = torch.linalg.vector_norm(t, dim=-1)
        return dots, norms

    def _linear_head_cosine(self, r: torch.Tensor, g: torch.Tensor, s: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Closed form of the cosine for the linear head: t_ij = s_ij·Wg_j + (Wr_i + b)."""
        lin: nn.Linear = self.head  # type: ignore[assignment]
        with full_precision():  # (n_i, n_t) products only: float32 costs little (see layers.full_precision)
            r, g, s, visual = r.float(), g.float(), s.float(), visual.float()
            wg = g @ lin.weight.T
            wr = r @ lin.weight.T + lin.bias
            dot = s * (visual @ wg.T) + (visual * wr).sum(-1, keepdim=True)
            norm_sq = s.square() * wg.square().sum(-1)[None] + 2 * s * (wr @ wg.T) + wr.square().sum(-1, keepdim=True)
            return dot / (norm_sq.clamp(min=1e-12).sqrt() * visual.norm(dim=-1, keepdim=True).clamp(min=1e-12))


@register_architecture("dove", DoveConfig)
class DOVE(RetrievalModel):
    """DOVE over cached backbone features (``level1..4``, ``regions``, ``region_mask``)."""

    image_inputs = ("level1", "level2", "level3", "level4", "regions", "region_mask")
    #: V_M and T_G (Eq. 29): the separable pair the global constraint (Eq. 30–31) trains.
    first_stage = ("global", "global")
    #: V_MR, the final visual embedding the ranking score is computed from.
    scene_embedding = "visual"
    #: V_MR and T_RG: the final pair of Eq. 31, whose cosine is ``final_scores`` (see ``pair_embeddings``).
    final_pair = ("V_MR", "T_RG")

    def __init__(self, config: DoveConfig, feature_dims: dict[str, Any], vocab_size: int) -> None:
        super().__init__(config)
        d = config.embed_dim
        level_channels = list(feature_dims["level_channels"])
        self.standardize = FeatureStandardizer(
            {**{f"level{i}": c for i, c in enumerate(level_channels, start=1)}, "regions": int(feature_dims["region_channels"])}
        )
        self.msv = MultiscaleVisual(level_channels, d)
        self.region_fc = nn.Linear(int(feature_dims["region_channels"]), d)  # Eq. 2
        self.word_embedding = nn.Embedding(vocab_size, config.word_dim, padding_idx=0)
        self.gru = RecurrentTextEncoder(config.word_dim, d)  # Eq. 3–4
        self.dtga = None if config.dtga == "none" else DTGA(d, config.attention_heads, config.dtga)
        self.ifa = IFA(d, config.ifa_head, config.score_scale) if config.ifa else None
        self.iga = IGA(d, config.iga_head, config.score_scale, config.pair_block) if config.iga else None

    @property
    def pairwise(self) -> bool:
        return self.iga is not None

    def encode_image(self, features: dict[str, torch.Tensor]) -> Encoding:
        levels = [self.standardize(f"level{i}", features[f"level{i}"]) for i in range(1, 5)]
        mask = features["region_mask"].bool()
        f_m = self.msv(levels)  # Eq. 1, (n, N_m, d)
        f_r = self.region_fc(self.standardize("regions", features["regions"]))  # Eq. 2, (n, N_r, d)
        if self.ifa is not None:
            f_mr = self.ifa(f_m, f_r, mask)
        else:
            f_mr = torch.cat([f_m, f_r], dim=1)  # "w/o IFA": concatenation
        fused_mask = torch.cat([torch.ones_like(mask[:, : f_m.shape[1]]), mask], dim=1)
        return {
            "visual": masked_mean(f_mr, fused_mask),  # V_MR
            "global": f_m.mean(dim=1),  # V_M, Eq. 29
            "region_mean": masked_mean(f_r, mask),  # E_R, Eq. 23
        }

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor, **extras: torch.Tensor) -> Encoding:
        states = self.gru.encode(self.word_embedding(tokens), lengths)
        words = states.words() if self.dtga is None else self.dtga(*states.directions(), states.mask)  # Eq. 5
        return {"global": masked_mean(words, states.mask)}  # T_G = E_G (Eq. 23, 29)

    def final_scores(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """cos(V_MR, T_RG) of every pair: the final pair of Eq. 31 (T_G in place of T_RG without IGA)."""
        if self.iga is None:
            return cosine_matrix(images["visual"], texts["global"])
        return self.iga.pair_scores(images["region_mean"], texts["global"], images["visual"])

    def pair_embeddings(self, images: Encoding, texts: Encoding) -> dict[str, torch.Tensor]:
        """V_M, V_R, V_MR, T_G and T_RG of aligned pairs (row k of ``images`` with row k of ``texts``).

        The embeddings of Sec. IV-F-2 / Fig. 9: V_M = the mean multiscale embedding (Eq. 29),
        V_MR = the final visual embedding, T_G = the mean word-level text embedding (Eq. 23, 29),
        T_RG = the IGA-guided text of the pair (Eq. 26–28, :meth:`IGA.aligned_texts`).

        V_R is the regional embedding *as IGA uses it*, F'_R = W_R E_R + b (Eq. 24): the paper says
        the regional embedding acts on the distances "by linear transformation as orientation",
        and F'_R is the term Eq. 27 adds to the text, so d(V_R, T_RG) < d(V_R, T_G) tests that
        orientation directly. Without IGA there is no such transformation: V_R = E_R (Eq. 23)
        and T_RG = T_G.
        """
        if images["visual"].shape[0] != texts["global"].shape[0]:
            raise ValueError(f"pair_embeddings needs aligned rows: {images['visual'].shape[0]} images, "
                             f"{texts['global'].shape[0]} texts")
        if self.iga is None:
            regional, guided = images["region_mean"], texts["global"]
        else:
            regional, guided = self.iga.aligned_texts(images["region_mean"], texts["global"])
        return {"V_M": images["global"], "V_R": regional, "V_MR": images["visual"], "T_G": texts["global"], "T_RG": guided}

    def similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """The ranking score of ``test_score``: the final cosine, plus cos(V_M, T_G) for ``final+global``."""
        scores = self.final_scores(images, texts)
        if self.config.test_score == "final+global":
            scores = scores + cosine_matrix(images["global"], texts["global"])
        return scores

    def encoding_loss(self, images: Encoding, texts: Encoding, image_ids: torch.Tensor,
                      caption_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        same = self.non_negatives(image_ids, caption_ids)
        final = triplet_ranking_loss(self.final_scores(images, texts), same, self.config.margin)
        constraint = triplet_ranking_loss(cosine_matrix(images["global"], texts["global"]), same, self.config.margin)
        return {"loss": final + self.config.lambda_g * constraint, "final": final.detach(), "global": constraint.detach()}
