"""Pyramid Vision GNN (Han et al., "Vision GNN: An Image is Worth Graph of Nodes", NeurIPS 2022).

ACF (Sec. 3.1.1) encodes each image with a ViG: the image is cut into patches, every patch is a
node, and each block links every node to its nearest neighbours in feature space and mixes their
features with a graph convolution. The pyramid variant used here has four stages whose outputs at
224 px are 56 × 56, 28 × 28, 14 × 14 and 7 × 7 nodes (strides 4, 8, 16, 32); the last stage is the
7 × 7 patch graph ACF builds its 49 region features on.

Architecture (from the ViG paper and its published model configuration; plain PyTorch):

* ``stem``: three 3 × 3 convolutions with BatchNorm (strides 2, 2, 1; GELU after the first two) to
  stride 4, plus a learned absolute position embedding ``pos_embed`` of the 56 × 56 grid.
* ``blocks``: the stages, flattened into one sequence as in the reference layout: stage i
  contributes ``depths[i]`` (Grapher, FFN) pairs, and a strided 3 × 3 convolution + BatchNorm
  (``Downsample``) sits between stages.
* Grapher: 1 × 1 conv + BN (``fc1``) → dynamic k-NN graph + max-relative graph convolution
  (``graph_conv``) doubling the channels → 1 × 1 conv + BN back (``fc2``) → residual.
  The graph of a block links every node to its k nearest key nodes under the squared Euclidean
  distance of the L2-normalised features, minus a fixed relative-position prior
  (``relative_pos``, closer nodes look nearer). With dilation d the k·d nearest are found and
  every d-th is kept. Max-relative aggregation: for node i, ``max_j (x_j − x_i)`` over its
  neighbours, interleaved channel by channel with x_i, then a grouped (4 groups) 1 × 1 conv + BN +
  GELU.
* Spatial reduction: in stages 1 and 2 the key nodes are the query map average-pooled by r = 4
  and 2 (r = 1 in stages 3 and 4), so at 224 px every stage searches over at most 196 keys
  instead of 3136 × 3136 pairs in stage 1.
* Neighbour count and dilation follow the reference schedule: k grows linearly from 9 (first
  block) to 18 (last block), and block b (0-based) uses dilation ``min(b // 4 + 1, 49 // 18)``.
* FFN: 1 × 1 conv + BN to 4 × width, GELU, 1 × 1 conv + BN back, residual.
* ``prediction``: global average pool, 1 × 1 conv to 1024 + BN + GELU + dropout, 1 × 1 conv to the
  classes; ignored by weight loading (``head_prefixes``) and unused for retrieval features.

Parameter names mirror the reference implementation's layout (``stem.convs.*``, ``pos_embed``,
``<block>.0.fc1.0.weight``, ``<block>.0.graph_conv.gconv.nn.0.weight``, ``<block>.1.fc2.1.*``,
``prediction.*``) except that the reference's top-level ``backbone.`` container is called
``blocks.`` here, because the weight loader strips a leading ``backbone.`` from checkpoint keys
(detector/retrieval wrappers use it); :func:`rename_reference_keys` converts a reference
checkpoint. Counts with a 1000-class head: 10.71 M (pvig_ti) and 27.25 M (pvig_s), as the ViG
paper's 10.7 M and 27.3 M.

Choices where the reference leaves room (none changes the parameter set):

* ``relative_pos`` is a buffer, not a parameter (it is never trained). Its value is computed in
  closed form: the product of the 2-D sine-cosine embeddings of a query node and a key node, scaled
  to 1 at zero offset. For a reduced key grid the key position is the centre of its pooled cell,
  rather than a bicubic resize of the full (N × N) table; a loaded checkpoint's table replaces it.
* Other input sizes: ``pos_embed`` is resized bicubically and the relative prior recomputed for
  the actual grids; a stage with fewer key nodes than k·d uses all of them.
* Random init: as the reference (Kaiming-normal convolutions, zero position embedding), except
  that residual branches end with a BatchNorm scale of 0.2 (:data:`RESIDUAL_INIT_SCALE`) so that
  an untrained network's features stay in range; it only matters without pretrained weights.
* Graph search ranks distances in float32 even under autocast (ranking bfloat16 distances would
  reorder most near neighbours).

Numerical caveat: a dilated k-NN list keeps every d-th rank, so swapping two near-equal
neighbours changes the graph. Features that differ only by rounding (bfloat16 vs float32, or
float32 convolutions run on another batch size, ~1e-6) therefore give visibly different deep
stages: with random weights, about 20–25 % relative difference at stages 3–4 for bfloat16 vs
float32 and ~12 % for a batch of 1 vs 3 (stages 1–2: 1–5 %). Images never interact: in float64
an image's features do not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rsitr.backbones.base import Backbone, register_backbone

#: Names of the four stage outputs returned by :meth:`PyramidViG.forward_levels`.
LEVEL_NAMES = ("stage1", "stage2", "stage3", "stage4")
#: Downsampling factor of each stage's output relative to the input image.
LEVEL_STRIDES = (4, 8, 16, 32)
#: Spatial reduction of the key nodes per stage (keys = queries average-pooled by r).
KEY_REDUCTION = (4, 2, 1, 1)
#: Grid side of the first stage at the design resolution (224 / 4), the size of ``pos_embed``.
DESIGN_GRID = 56
#: Initial scale of the last BatchNorm of each residual branch. An untrained network runs with
#: BatchNorm at its initial statistics (an identity) in eval mode; with scale 1 every block then
#: multiplies the activation scale about fourfold and the last stage reaches ~1e7, beyond the
#: float16 range of the feature cache. At 0.2 the stage outputs of unit-variance noise stay
#: between ~1.5 and ~15 (a random ResNet-50's span is 0.6 to 36). Pretrained weights overwrite it.
RESIDUAL_INIT_SCALE = 0.2


def _conv_bn(in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Convolution with bias followed by BatchNorm (keys ``.0`` and ``.1``)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups),
        nn.BatchNorm2d(out_ch),
    )


def sincos_relative_position(dim: int, query_hw: tuple[int, int], reduction: int = 1) -> Tensor:
    """Fixed relative-position prior between a query grid and its ``reduction``-pooled key grid.

    For 2-D sine-cosine embeddings with F = dim // 4 frequencies per axis, the dot product of the
    embeddings of two positions depends only on their offset (Δh, Δw):
    ``(1 / 2F) Σ_f [cos(ω_f Δh) + cos(ω_f Δw)]`` with ``ω_f = 10000^(−f/F)``, which is 1 at zero
    offset and decays with distance. Key node (a, b) of the pooled grid sits at the centre of its
    r × r cell, ``(a r + (r − 1) / 2, b r + (r − 1) / 2)`` in query-grid units.

    Returns:
        float32 (N_query, N_key) in row-major node order; the graph subtracts it from distances.
    """
    h, w = query_hw
    freqs = max(dim // 4, 1)
    omega = 10000.0 ** (-torch.arange(freqs, dtype=torch.float64) / freqs)

    def axis_table(size: int) -> Tensor:
        """Σ_f cos(ω_f Δ) between every query coordinate and every key-cell centre of one axis."""
        queries = torch.arange(size, dtype=torch.float64)
        keys = torch.arange(max(size // reduction, 1), dtype=torch.float64) * reduction + (reduction - 1) / 2
        return torch.cos((queries[:, None] - keys[None, :])[..., None] * omega).sum(-1)

    rows, cols = axis_table(h), axis_table(w)  # (h, h_k), (w, w_k): the prior is separable
    prior = (rows[:, None, :, None] + cols[None, :, None, :]) / (2 * freqs)  # (h, w, h_k, w_k)
    return prior.reshape(h * w, -1).float()


def knn_graph(queries: Tensor, keys: Tensor, k: int, dilation: int = 1, prior: Tensor | None = None) -> Tensor:
    """Indices of the dilated k nearest key nodes of every query node.

    Args:
        queries: (B, N, C) node features.
        keys: (B, M, C) candidate neighbours (the queries themselves, or a pooled copy).
        k: neighbours kept per node.
        dilation: the ``k * dilation`` nearest are ranked and every ``dilation``-th kept.
        prior: optional (N, M) relative-position similarity subtracted from the distances.

    Returns:
        int64 (B, N, k') with k' = ceil(min(k·dilation, M) / dilation), nearest first.

    Distances are squared Euclidean between L2-normalised features, ``2 − 2 cos``, minus the prior;
    the smallest distances are the largest ``2 cos + prior``, which is what is ranked. Computed in
    float32 (float64 for float64 input) with autocast disabled so that reduced precision does not
    reorder neighbours.
    """
    dtype = torch.promote_types(queries.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(device_type=queries.device.type, enabled=False):
        q = F.normalize(queries.to(dtype), dim=-1)
        kf = F.normalize(keys.to(dtype), dim=-1)
        closeness = torch.bmm(q, kf.transpose(1, 2))
        if prior is not None:
            closeness = closeness.mul_(2.0).add_(prior.to(q.device, dtype))
        count = min(k * dilation, keys.shape[1])
        nearest = torch.topk(closeness, count, dim=-1, largest=True, sorted=True).indices
    return nearest[..., ::dilation]


def max_relative(queries: Tensor, keys: Tensor, neighbours: Tensor) -> Tensor:
    """``max_j (key_j − query_i)`` over the neighbours j of each query node i.

    Because ``query_i`` does not depend on j this equals ``max_j key_j − query_i``, so only the
    neighbours' features are gathered, one neighbour rank at a time into a running maximum (a
    cache-sized working set; gathering all k at once is several times slower on CPU). Shapes:
    queries (B, N, C), keys (B, M, C), neighbours (B, N, k) → (B, N, C).
    """
    b, m, c = keys.shape
    flat = keys.reshape(b * m, c)
    rows = neighbours + (torch.arange(b, device=keys.device) * m).view(b, 1, 1)
    best = flat.index_select(0, rows[..., 0].reshape(-1))
    for rank in range(1, rows.shape[-1]):
        best = torch.maximum(best, flat.index_select(0, rows[..., rank].reshape(-1)))
    return best.view(queries.shape) - queries


class Stem(nn.Module):
    """Three 3 × 3 convolutions to stride 4 (``convs.0/3/6`` with BatchNorm ``convs.1/4/7``)."""

    def __init__(self, out_ch: int, in_ch: int = 3) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_ch, out_ch // 2, 3, stride=2, padding=1), nn.BatchNorm2d(out_ch // 2), nn.GELU(),
            nn.Conv2d(out_ch // 2, out_ch, 3, stride=2, padding=1), nn.BatchNorm2d(out_ch), nn.GELU(),
            nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1), nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x)


class Downsample(nn.Module):
    """Strided 3 × 3 convolution + BatchNorm between stages (halves the grid, changes the width)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = _conv_bn(in_ch, out_ch, kernel=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class MaxRelativeConv(nn.Module):
    """Max-relative graph convolution: ``[x_i, max_j(x_j − x_i)]`` → grouped 1 × 1 conv, BN, GELU."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.nn = nn.Sequential(
            nn.Conv2d(2 * channels, out_channels, 1, groups=4), nn.BatchNorm2d(out_channels), nn.GELU(),
        )

    def forward(self, nodes: Tensor, keys: Tensor, neighbours: Tensor, grid: tuple[int, int]) -> Tensor:
        """nodes (B, N, C), keys (B, M, C), neighbours (B, N, k) → (B, out, H, W).

        The two inputs are interleaved per channel (``x_0, r_0, x_1, r_1, ...``) so that each of
        the four convolution groups sees whole (feature, relative) pairs.
        """
        relative = max_relative(nodes, keys, neighbours)
        b, _, c = nodes.shape
        paired = torch.stack([nodes, relative], dim=-1).reshape(b, grid[0], grid[1], 2 * c)
        return self.nn(paired.permute(0, 3, 1, 2))


class DynamicGraphConv(nn.Module):
    """Build the k-NN graph of the current features, then apply :class:`MaxRelativeConv`."""

    def __init__(self, channels: int, out_channels: int, k: int, dilation: int, reduction: int) -> None:
        super().__init__()
        self.k = k
        self.dilation = dilation
        self.reduction = reduction
        self.gconv = MaxRelativeConv(channels, out_channels)

    def forward(self, x: Tensor, prior: Tensor | None) -> Tensor:
        h, w = x.shape[-2:]
        pooled = F.avg_pool2d(x, self.reduction, self.reduction) if self.reduction > 1 else x
        nodes = x.flatten(2).transpose(1, 2)  # (B, N, C); a view for channels_last input
        keys = pooled.flatten(2).transpose(1, 2)
        neighbours = knn_graph(nodes, keys, self.k, self.dilation, prior)
        return self.gconv(nodes, keys, neighbours, (h, w))


class Grapher(nn.Module):
    """fc1 → dynamic graph convolution (width × 2) → fc2, with a residual connection."""

    relative_pos: Tensor

    def __init__(self, channels: int, k: int, dilation: int, reduction: int, grid: int) -> None:
        super().__init__()
        self.reduction = reduction
        self.fc1 = _conv_bn(channels, channels)
        self.graph_conv = DynamicGraphConv(channels, 2 * channels, k, dilation, reduction)
        self.fc2 = _conv_bn(2 * channels, channels)
        self.grid = grid
        self.register_buffer("relative_pos", sincos_relative_position(channels, (grid, grid), reduction)[None])
        self._other_priors: dict[tuple[int, int, str], Tensor] = {}

    def prior(self, h: int, w: int) -> Tensor:
        """The (N, M) relative-position prior for an h × w grid (the buffer at the design size).

        Other sizes are computed once per (size, device) and kept outside the state dict.
        """
        if (h, w) == (self.grid, self.grid):
            return self.relative_pos[0]
        key = (h, w, str(self.relative_pos.device))
        if key not in self._other_priors:
            table = sincos_relative_position(cast(nn.Conv2d, self.fc1[0]).in_channels, (h, w), self.reduction)
            self._other_priors[key] = table.to(self.relative_pos.device)
        return self._other_priors[key]

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc1(x)
        out = self.graph_conv(out, self.prior(x.shape[2], x.shape[3]))
        return self.fc2(out) + x


class FFN(nn.Module):
    """Two 1 × 1 conv + BN layers (width × 4 hidden) with GELU between, residual."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        self.fc1 = _conv_bn(channels, channels * expansion)
        self.act = nn.GELU()
        self.fc2 = _conv_bn(channels * expansion, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x))) + x


def neighbour_schedule(depths: tuple[int, ...], k: int) -> list[tuple[int, int]]:
    """(k, dilation) of every block: k rises linearly from ``k`` to ``2k``; dilation ``min(b // 4 + 1, 49 // 2k)``."""
    total = sum(depths)
    ks = [int(v) for v in torch.linspace(k, 2 * k, total).tolist()]
    max_dilation = max(49 // max(ks), 1)
    return [(ks[b], min(b // 4 + 1, max_dilation)) for b in range(total)]


class PyramidViG(Backbone):
    """Pyramid ViG: stem + position embedding, four Grapher/FFN stages, pooled 1 × 1-conv classifier."""

    head_prefixes = ("prediction.",)

    def __init__(self, channels: tuple[int, ...], depths: tuple[int, ...], k: int = 9, num_classes: int = 1000,
                 hidden: int = 1024, dropout: float = 0.0, name: str = "pvig") -> None:
        super().__init__()
        self.name = name
        self.level_channels = tuple(channels)
        self.level_strides = LEVEL_STRIDES
        self.num_features = channels[-1]
        self.stem = Stem(channels[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, channels[0], DESIGN_GRID, DESIGN_GRID))
        blocks: list[nn.Module] = []
        self._stage_ends: list[int] = []
        schedule = iter(neighbour_schedule(tuple(depths), k))
        grid = DESIGN_GRID
        for stage, (width, depth) in enumerate(zip(channels, depths)):
            if stage > 0:
                blocks.append(Downsample(channels[stage - 1], width))
                grid //= 2
            for _ in range(depth):
                block_k, dilation = next(schedule)
                blocks.append(nn.Sequential(Grapher(width, block_k, dilation, KEY_REDUCTION[stage], grid), FFN(width)))
            self._stage_ends.append(len(blocks) - 1)
        self.blocks = nn.Sequential(*blocks)
        self.prediction = nn.Sequential(
            nn.Conv2d(channels[-1], hidden, 1), nn.BatchNorm2d(hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Conv2d(hidden, num_classes, 1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming-normal (fan-in) convolutions with zero bias, zero position embedding, BatchNorm 1/0.

        Exception: the last BatchNorm of every residual branch (``Grapher.fc2``, ``FFN.fc2``) starts
        at scale :data:`RESIDUAL_INIT_SCALE`; see there.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (Grapher, FFN)):
                nn.init.constant_(cast(nn.BatchNorm2d, m.fc2[1]).weight, RESIDUAL_INIT_SCALE)

    def embed(self, x: Tensor) -> Tensor:
        """Stem plus the position embedding (resized bicubically off the 56 × 56 design grid).

        The embedding is cast to the stem's output dtype, so that under autocast the residual
        stream stays in the reduced precision instead of being promoted to float32 here and cast
        back before every convolution.
        """
        x = self.stem(x)
        pos: Tensor = self.pos_embed
        if pos.shape[-2:] != x.shape[-2:]:
            pos = F.interpolate(pos, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return x + pos.to(x.dtype)

    def forward_levels(self, x: Tensor) -> list[Tensor]:
        """Outputs of the four stages (strides 4, 8, 16, 32; 56, 28, 14, 7 nodes per side at 224 px)."""
        x = self.embed(x)
        levels = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._stage_ends:
                levels.append(x)
        return levels

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool; with ``pre_logits`` the pooled (n, C) features, else the class logits."""
        pooled = F.adaptive_avg_pool2d(x, 1)
        if pre_logits:
            return torch.flatten(pooled, 1)
        return torch.flatten(self.prediction(pooled), 1)


def rename_reference_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A reference Pyramid ViG state dict with its ``backbone.<i>.`` keys renamed ``blocks.<i>.``.

    Save the result (e.g. as safetensors) and load it with :func:`rsitr.backbones.load_backbone_weights`.
    """
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        renamed[f"blocks.{rest}" if head == "backbone" and rest[:1].isdigit() else key] = value
    return renamed


@register_backbone("pvig_ti", (48, 96, 240, 384), LEVEL_STRIDES, LEVEL_NAMES, input_size=224)
def pvig_ti(num_classes: int = 1000) -> PyramidViG:
    """Pyramid ViG-Ti: widths 48/96/240/384, depths 2/2/6/2, k = 9 (10.7 M parameters)."""
    return PyramidViG((48, 96, 240, 384), (2, 2, 6, 2), k=9, num_classes=num_classes, name="pvig_ti")


@register_backbone("pvig_s", (80, 160, 400, 640), LEVEL_STRIDES, LEVEL_NAMES, input_size=224)
def pvig_s(num_classes: int = 1000) -> PyramidViG:
    """Pyramid ViG-S: widths 80/160/400/640, depths 2/2/6/2, k = 9 (27.3 M parameters)."""
    return PyramidViG((80, 160, 400, 640), (2, 2, 6, 2), k=9, num_classes=num_classes, name="pvig_s")


__all__ = ["LEVEL_NAMES", "LEVEL_STRIDES", "PyramidViG", "knn_graph", "max_relative",
           "pvig_s", "pvig_ti", "rename_reference_keys", "sincos_relative_position"]
