"""Building blocks shared by the retrieval models."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is True."""
    if mask is None:
        return x.mean(dim=dim)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=dim) / weights.sum(dim=dim).clamp(min=1.0)


def length_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B, L) bool mask of the valid positions of padded sequences."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


class ResidualMLP(nn.Module):
    """``MLP(x) + x`` with a two-layer MLP (Linear → ReLU → Linear), the non-linear head of DOVE.

    No normalisation layer: a batch statistic would make one item's embedding depend on the
    other items of its batch, which evaluation must never allow.
    """

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden or dim)
        self.fc2 = nn.Linear(hidden or dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) + x


def make_head(kind: str, dim: int) -> nn.Module:
    """A decoding head: ``"linear"`` (one Linear) or ``"nonlinear"`` (:class:`ResidualMLP`)."""
    if kind == "linear":
        return nn.Linear(dim, dim)
    if kind == "nonlinear":
        return ResidualMLP(dim)
    raise ValueError(f"unknown head {kind!r}; use 'linear' or 'nonlinear'")


class GatedSelfAttention(nn.Module):
    """Gated self-attention (DOVE Eq. 6–11) with several heads.

    Q, K, V are linear maps of the input (Eq. 7); a gate ``G = σ((Q ⊙ K) W_A + b_A)`` (Eq. 8)
    scales queries and keys (Eq. 9–10) before scaled dot-product attention (Eq. 11). With h heads
    the scale is ``sqrt(d / h)``, the per-head width, which reduces to Eq. 11's ``sqrt(d)`` at h = 1.
    Padded key positions are masked out of the softmax.
    """

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)
        g = torch.sigmoid(self.gate(q * k))
        q, k = g * q, g * k

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // self.heads)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ split(v)
        return out.transpose(1, 2).reshape(batch, length, dim)


def full_precision() -> torch.autocast:
    """A region where CPU autocast is off, for the last step of a score.

    Under bf16 autocast a product's output is rounded to bfloat16: 8 significant bits, a step of
    0.004 near a cosine of 1. Retrieval ranks hundreds of candidates whose scores differ by less,
    so bf16 scores tie and reorder (on UCM-Captions val this cost DOVE about 0.7 mR). Scores are
    therefore finished in float32 from the bf16 encodings; this is a d-wide product per pair,
    negligible beside the work autocast speeds up.
    """
    return torch.autocast("cpu", enabled=False)


def row_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine of matching rows along the last dimension, in float32 even under autocast.

    float32 inputs take one ``einsum`` for the dot product and two norms, with no (…, D)
    temporaries; lower-precision inputs (bf16 under autocast) multiply in their own dtype and
    sum in float32 (see :func:`full_precision`).
    """
    with full_precision():
        if a.dtype == torch.float32 and b.dtype == torch.float32:
            dot = torch.einsum("...d,...d->...", a, b)
        else:
            dtype = torch.promote_types(a.dtype, b.dtype)
            dot = (a.to(dtype) * b.to(dtype)).sum(-1, dtype=torch.float32)
        norms = (torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
                 * torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32))
        return dot / norms.clamp(min=eps)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarity of the rows of ``a`` (n, d) and ``b`` (m, d), in float32 even under autocast."""
    with full_precision():
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


class FeatureStandardizer(nn.Module):
    """Per-channel standardisation of frozen-backbone features with training-split statistics.

    Pooled features of a frozen CNN are nearly collinear across remote-sensing images (the mean
    cosine between two UCM images is 0.998 for a random-init ResNet-50 and similar for
    ImageNet weights), so the image-dependent part is a small offset on a large common vector and
    the first projection learns slowly. Subtracting the training mean and dividing by the
    training standard deviation of each channel removes that common vector. The statistics are
    buffers: fitted once before training, saved in the checkpoint, fixed at evaluation, so one
    image's features never depend on other images of its batch.
    """

    def __init__(self, channels: dict[str, int]) -> None:
        super().__init__()
        self.keys = list(channels)
        for key, c in channels.items():
            self.register_buffer(f"{key}_mean", torch.zeros(c))
            self.register_buffer(f"{key}_std", torch.ones(c))

    @torch.no_grad()
    def fit(self, features: dict[str, torch.Tensor], mask_key: str = "region_mask") -> None:
        """Estimate mean and std of every channel; 3-D features (n, regions, C) use valid regions only."""
        for key in self.keys:
            x = features[key].float()
            if x.dim() == 3:
                x = x[features[mask_key].bool()] if mask_key in features else x.reshape(-1, x.shape[-1])
            getattr(self, f"{key}_mean").copy_(x.mean(dim=0))
            getattr(self, f"{key}_std").copy_(x.std(dim=0).clamp(min=1e-6))

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - getattr(self, f"{key}_mean")) / getattr(self, f"{key}_std")
