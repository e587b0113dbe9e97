"""Building blocks shared by the retrieval models."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

#: Half-width of the uniform initialisation of word vectors (VSE++ and SCAN).
WORD_INIT_RANGE = 0.1
#: How :class:`FeatureStandardizer` computes its moments (see there).
MOMENTS = ("mean_std", "std_mean", "float64")


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

    The layout of a feature says which axis holds the channels and which axes the statistics run
    over: vectors (n, C) over the images; region or node sets (n, N, C) over the images and their
    valid members (``mask_key`` of the features; all members when it is absent); maps
    (n, C, h, w), channels on axis 1, over the images and every position. ``forward`` keeps the
    layout of its input.

    ``moments`` only sets how the two moments are computed, so that every model keeps the
    statistics it has always been fitted with, bit for bit: ``"mean_std"`` (``torch.mean`` and
    ``torch.std``), ``"std_mean"`` (one ``torch.std_mean``, ACF) or ``"float64"`` (sums of x and
    x² accumulated in float64 over ``fit_chunk`` images at a time, DSAN), which never copies the
    whole training set (4.6 GB in float32 for RSICD's 8,737 training grids of 64 × 2048). All give
    the unbiased std, floored at 1e-6.
    """

    def __init__(self, channels: dict[str, int], moments: str = "mean_std", fit_chunk: int = 256) -> None:
        super().__init__()
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
        self.keys = list(channels)
        self.moments = moments
        self.fit_chunk = fit_chunk  # images per accumulation step of "float64"
        for key, c in channels.items():
            self.register_buffer(f"{key}_mean", torch.zeros(c))
            self.register_buffer(f"{key}_std", torch.ones(c))

    @torch.no_grad()
    def fit(self, features: dict[str, torch.Tensor], mask_key: str = "region_mask") -> None:
        """Estimate the mean and std of every channel of every key this standardiser holds."""
        mask = features[mask_key].bool() if mask_key in features else None
        for key in self.keys:
            if self.moments == "float64":
                mean, std = self._float64_moments(features[key], mask)
            else:
                mean, std = self._moments(features[key].float(), mask)
            getattr(self, f"{key}_mean").copy_(mean)
            getattr(self, f"{key}_std").copy_(std.clamp(min=1e-6))

    def _moments(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) over the statistics axes: one reduction each (``"mean_std"``) or a joint one (``"std_mean"``)."""
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        if x.dim() == 3:
            x = _set_members(x, mask)
        if self.moments == "std_mean":
            std, mean = torch.std_mean(x, dim=dims)
            return mean, std
        return x.mean(dim=dims), x.std(dim=dims)

    def _float64_moments(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) from float64 sums over chunks of ``fit_chunk`` images, one (samples, C) block each."""
        count = 0
        total: torch.Tensor | float = 0.0
        total_sq: torch.Tensor | float = 0.0
        for start in range(0, x.shape[0], self.fit_chunk):
            chunk = x[start : start + self.fit_chunk]
            if chunk.dim() == 4:  # every position of every map a sample
                rows = chunk.flatten(2).transpose(1, 2).reshape(-1, chunk.shape[1])
            elif chunk.dim() == 3:
                rows = _set_members(chunk, None if mask is None else mask[start : start + self.fit_chunk])
            else:
                rows = chunk
            rows = rows.double()
            count += rows.shape[0]
            total = total + rows.sum(dim=0)
            total_sq = total_sq + rows.square().sum(dim=0)
        mean = cast(torch.Tensor, total / count)  # the sums are tensors once a chunk was added
        var = (total_sq - count * mean.square()) / max(count - 1, 1)
        return mean.float(), var.clamp(min=0).sqrt().float()

    def forward(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised with the statistics of ``key``: channels on axis 1 of a map, last otherwise."""
        mean, std = getattr(self, f"{key}_mean"), getattr(self, f"{key}_std")
        if x.dim() == 4:
            mean, std = mean[:, None, None], std[:, None, None]
        return (x.float() - mean) / std


def _set_members(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(samples, C) valid members of a set (n, N, C): those of ``mask`` (n, N), or all of them."""
    return x[mask] if mask is not None else x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------------------------------- text side


def init_word_embedding(embedding: nn.Embedding) -> None:
    """Uniform(-0.1, 0.1) word vectors with the padding row kept at zero (VSE++ and SCAN)."""
    with torch.no_grad():
        embedding.weight.uniform_(-WORD_INIT_RANGE, WORD_INIT_RANGE)
        if embedding.padding_idx is not None:
            embedding.weight[embedding.padding_idx].zero_()


def init_projection(linear: nn.Linear) -> None:
    """Xavier-uniform weights and zero bias for a projection into the joint space (VSE++ and SCAN)."""
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def _mean_of_directions(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The only direction, or ``(forward + backward) / 2``."""
    return parts[0] if len(parts) == 1 else (parts[0] + parts[1]) / 2


@dataclass(frozen=True)
class RecurrentStates:
    """What :meth:`RecurrentTextEncoder.encode` gives for n padded captions of width L (hidden size h)."""

    outputs: torch.Tensor  #: (n, L, directions · h) last layer per word, forward first, zero past each caption
    final: torch.Tensor  #: (n, h) last layer's state at the true length, mean of the directions
    mask: torch.Tensor  #: (n, L) bool, the valid words

    def directions(self) -> tuple[torch.Tensor, ...]:
        """Per-word outputs of each direction, ``(forward,)`` or ``(forward, backward)``, (n, L, h) each."""
        return self.outputs.split(self.final.shape[-1], dim=-1)

    def words(self) -> torch.Tensor:
        """(n, L, h) per-word outputs, the directions averaged."""
        return _mean_of_directions(self.directions())

    def mean(self) -> torch.Tensor:
        """(n, h) mean of :meth:`words` over each caption's true length (zero for an empty caption)."""
        return masked_mean(self.words(), self.mask)


class RecurrentTextEncoder(nn.GRU):
    """The one recurrent word encoder of the zoo: a batch-first GRU over padded captions.

    VSE++ and SCAN, AMFMN (Eq. 10–12), DOVE (Eq. 3–4), DSAN (Eq. 1–4) and ACF (Eq. 3) all read a
    caption with a GRU over word vectors (bidirectional, except in VSE++ by default) and differ
    only in what they take from it. :meth:`encode` runs it once and returns :class:`RecurrentStates`, from which
    each model takes its part: per-word outputs with the directions averaged (SCAN, DSAN, ACF) or
    apart (DOVE's DTGA), their mean over the caption (AMFMN, DOVE, VSE++ ``"mean"``), or the final
    state at the true length (VSE++ ``"last"``; forward state after the last word, backward state
    after the first).

    Padding never enters a state and the backward direction starts at each caption's last word.
    :meth:`encode` sorts the captions by length and runs both directions together
    (:class:`_GRURecurrence`): at step t only the captions longer than t take a step, the
    backward direction reads each caption reversed within its own length (:func:`reversal_index`),
    so the states equal those of the packed ``nn.GRU`` run (:meth:`encode_packed`, kept as the
    reference) up to float rounding. Why not the packed ``nn.GRU``: on the CPU it is a composite of
    per-step ops under autograd that slices the input projection and the outputs once per step,
    and the backward of every slice materialises a full-size gradient, a cost quadratic in the
    caption width (about half of the GRU's training time in bf16). Here the input projection is
    one GEMM per direction, the recurrence has a hand-written backward (BPTT) and the recurrent
    weight's gradient is one GEMM over all steps instead of one per step.
    A caption of length 0 (no keywords) is run for one padding step and has no valid word, so its
    :meth:`RecurrentStates.mean` is zero.

    It subclasses ``nn.GRU`` instead of holding one so that its parameters keep the names
    (``weight_ih_l0``, …) and the order of random initialisation of the plain ``nn.GRU`` each
    model held before: older checkpoints load unchanged and a seeded model is bit-identical.
    Calling the module itself is the plain ``nn.GRU`` forward.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = True) -> None:
        super().__init__(input_size, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)

    def encode(self, embedded: torch.Tensor, lengths: torch.Tensor) -> RecurrentStates:
        """Run over word vectors ``embedded`` (n, L, input_size) of captions with true ``lengths`` (n,) ≤ L."""
        steps = embedded.shape[1]
        runs = lengths.to(embedded.device).clamp(min=1)  # a caption of length 0 takes one padding step
        order = torch.argsort(runs, descending=True, stable=True)
        runs = runs[order]
        active = (runs[None, :] > torch.arange(steps, device=runs.device)[:, None]).sum(1).tolist()
        reverse = reversal_index(runs, steps)
        suffixes = ("", "_reverse") if self.bidirectional else ("",)
        x, final = embedded[order], embedded.new_zeros(0)
        for layer in range(self.num_layers):
            names = [f"_l{layer}{suffix}" for suffix in suffixes]
            gates = torch.stack([F.linear(take_steps(x, reverse) if suffix else x,
                                          getattr(self, f"weight_ih{name}"), getattr(self, f"bias_ih{name}"))
                                 for suffix, name in zip(suffixes, names)])  # x W_ih^T + b_ih, (D, n, L, 3h)
            w_hh = torch.stack([getattr(self, f"weight_hh{name}") for name in names])
            b_hh = torch.stack([getattr(self, f"bias_hh{name}") for name in names])
            states, final = _GRURecurrence.apply(gates, w_hh, b_hh, active)
            parts = [states[0]] + ([take_steps(states[1], reverse)] if self.bidirectional else [])
            x = torch.cat(parts, dim=-1)
        unsort = torch.argsort(order)
        outputs = x[unsort]
        final = _mean_of_directions(tuple(final[:, unsort]))  # the last layer's direction(s)
        return RecurrentStates(outputs, final, length_mask(lengths.to(outputs.device), steps))

    def encode_packed(self, embedded: torch.Tensor, lengths: torch.Tensor) -> RecurrentStates:
        """REFERENCE: :meth:`encode` through ``pack_padded_sequence`` (the previous implementation, for tests and benchmarks)."""
        steps = embedded.shape[1]
        packed = pack_padded_sequence(embedded, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        output, h_n = self(packed)
        outputs, _ = pad_packed_sequence(output, batch_first=True, total_length=steps)
        directions = 2 if self.bidirectional else 1
        final = _mean_of_directions(tuple(h_n[-directions:]))  # the last layer's direction(s)
        return RecurrentStates(outputs, final, length_mask(lengths.to(outputs.device), steps))


def _compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the recurrence's matrix products: autocast's when it is on, else the inputs'."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


class _GRURecurrence(torch.autograd.Function):
    """The GRU recurrence of D directions over a batch sorted by decreasing length, with its backward.

    Inputs: ``gates`` (D, n, L, 3h), the input projections ``x_t W_ih^T + b_ih`` (computed
    outside, where autograd handles them as one GEMM), ``w_hh`` (D, 3h, h), ``b_hh`` (D, 3h) and
    ``active`` (L ints), the number of leading rows that take step t. Outputs: the states (D, n, L, h),
    zero where a row takes no step, and each row's state after its last step (D, n, h).

    The cell is ``nn.GRU``'s: r, z = σ(gi + gh), n = tanh(gi_n + r ⊙ gh_n), h' = n + z ⊙ (h − n)
    with gh = h W_hh^T + b_hh. Choice: the matrix products run in the compute dtype
    (:func:`_compute_dtype`, bf16 under CPU autocast, the weights cast once per call) and the gate
    arithmetic and the states in the weights' dtype (float32 in training), so bf16 rounds only the products' operands and outputs,
    as autocast does for ``nn.GRU``'s products. The backward runs the steps in reverse with the
    same products, then forms the gradient of W_hh and b_hh from all steps at once (one batched
    GEMM of the stacked gate gradients and the previous states).
    """

    @staticmethod
    def forward(ctx: Any, gates: torch.Tensor, w_hh: torch.Tensor,
                b_hh: torch.Tensor, active: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(gates.device.type, gates.dtype)
        directions, n, steps, _ = gates.shape
        hidden, acc = w_hh.shape[-1], w_hh.dtype
        active = [rows for rows in active if rows > 0]
        with torch.autocast(gates.device.type, enabled=False):
            w_t, bias = w_hh.to(dtype).transpose(1, 2), b_hh.to(dtype)[:, None, :]
            h = gates.new_zeros(directions, n, hidden, dtype=acc)
            states = gates.new_zeros(directions, n, steps, hidden, dtype=acc)
            # Every step's previous state, in the product dtype: the operand of W_hh's gradient (one GEMM in backward).
            previous = gates.new_empty(directions, sum(active), hidden, dtype=dtype)
            saved, offset = [], 0
            for t, rows in enumerate(active):
                h_prev = h[:, :rows].clone()
                h_low = previous[:, offset : offset + rows]
                h_low.copy_(h_prev)
                gh = torch.baddbmm(bias, h_low, w_t).to(acc)
                gi = gates[:, :rows, t].to(acc)
                rz = torch.sigmoid(gi[..., : 2 * hidden] + gh[..., : 2 * hidden])
                r, z = rz[..., :hidden], rz[..., hidden:]
                gh_n = gh[..., 2 * hidden :]
                new = torch.tanh(torch.addcmul(gi[..., 2 * hidden :], r, gh_n))
                h_next = torch.addcmul(new, z, h_prev - new)
                h[:, :rows] = h_next
                states[:, :rows, t] = h_next
                saved.append((h_prev, rz, new, gh_n))
                offset += rows
        ctx.saved = saved
        ctx.active = active
        ctx.dtype = dtype
        ctx.shapes = (gates.shape, gates.dtype)
        ctx.save_for_backward(w_hh, previous)
        return states, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_states: torch.Tensor | None,
                 d_final: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        w_hh, previous = ctx.saved_tensors
        (shape, gates_dtype), dtype = ctx.shapes, ctx.dtype
        directions, n, steps, width = shape
        hidden, acc = width // 3, w_hh.dtype
        with torch.autocast(w_hh.device.type, enabled=False):
            w = w_hh.to(dtype)
            dh = (d_final.to(acc, copy=True) if d_final is not None
                  else torch.zeros(directions, n, hidden, dtype=acc, device=w_hh.device))
            d_gates = torch.zeros(shape, dtype=gates_dtype, device=w_hh.device)
            d_gh_all = torch.empty(directions, previous.shape[1], width, dtype=dtype, device=w_hh.device)
            offset = previous.shape[1]
            for t in range(len(ctx.active) - 1, -1, -1):
                rows = ctx.active[t]
                offset -= rows
                h_prev, rz, new, gh_n = ctx.saved[t]
                r, z = rz[..., :hidden], rz[..., hidden:]
                d_h = dh[:, :rows]
                if d_states is not None:
                    d_h = d_h + d_states[:, :rows, t].to(acc)
                d_pre_n = d_h * (1 - z) * (1 - new * new)  # through n = tanh(·)
                d_gh = d_gh_all[:, offset : offset + rows]
                d_gh[..., :hidden] = d_pre_n * gh_n * r * (1 - r)  # r
                d_gh[..., hidden : 2 * hidden] = d_h * (h_prev - new) * z * (1 - z)  # z
                d_gates[:, :rows, t] = d_gh  # the r and z parts are those of the input gates
                d_gates[:, :rows, t, 2 * hidden :] = d_pre_n
                d_gh[..., 2 * hidden :] = d_pre_n * r
                dh[:, :rows] = torch.baddbmm((d_h * z).to(dtype), d_gh, w).to(acc)
            d_w_hh = torch.bmm(d_gh_all.transpose(1, 2), previous).to(w_hh.dtype)
            d_b_hh = d_gh_all.to(acc).sum(dim=1)
        return d_gates, d_w_hh, d_b_hh, None


def reversal_index(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(n, L) time index that reverses each row's first ``lengths`` steps and keeps the rest in place.

    The map is its own inverse, so :func:`take_steps` with it both reverses a padded batch and
    puts a reversed run's outputs back in caption order.
    """
    t = torch.arange(steps, device=lengths.device)[None, :]
    return torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)


def take_steps(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]`` for a batch-first ``x`` (n, L, h) and a time index (n, K): (n, K, h)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
