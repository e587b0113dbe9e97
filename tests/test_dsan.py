"""DSAN / SAM: shapes, the equations written out pair by pair, hand-computed attention, training, configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from helpers import loss_curve
from rsitr.errors import ConfigError
from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import ModelSpec, create_model, get_model_spec
from rsitr.models.base import concat_encodings, take_rows
from rsitr.models.dsan import DsanConfig, attention_weights, gated_update, grid_cells
from rsitr.models.registry import build_config

CHANNELS, SIDE, VOCAB = 24, 3, 50
DIMS = {"maps": {"mixed_7c": (CHANNELS, SIDE)}, "level_channels": (192, 288, 768, CHANNELS)}
VARIANTS = ("dsan-t2i", "dsan-i2t")


def small(name: str = "dsan-t2i", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, DIMS, VOCAB, embed_dim=32, word_dim=16, **overrides)


def fake_grid(n: int, seed: int = 0, side: int = SIDE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"map_mixed_7c": torch.randn(n, CHANNELS, side, side, generator=g)}


def fake_text(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=g)
    lengths[0] = 8
    tokens = torch.randint(1, VOCAB, (n, 8), generator=g)
    tokens[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


# --------------------------------------------------------------------------- reference, pair by pair


def _gate(x: torch.Tensor, e: torch.Tensor, sam) -> torch.Tensor:
    """Eq. 9–11 / 14–16 for one item, literally: concat, two linear maps, two sigmoids, the update."""
    joint = torch.cat([x, e])
    g = torch.sigmoid(sam.update_gate.weight @ joint + sam.update_gate.bias)
    c = torch.sigmoid(sam.memory_cell.weight @ joint + sam.memory_cell.bias)
    return (1 - g) * x + g * c


def reference_score(model, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """S(F, T) of one pair from the equations: f (K, D) regions, t (N, D) the caption's real words."""
    cfg, sam = model.config, model.sam
    k, n = f.shape[0], t.shape[0]
    sim = torch.stack([torch.stack([F.cosine_similarity(f[i], t[j], dim=0) for j in range(n)]) for i in range(k)])
    s = sim.clamp(min=0)  # Eq. 7
    if cfg.variant == "i2t":
        s_bar = s / s.norm(dim=0, keepdim=True).clamp(min=1e-8)  # Eq. 6: over regions i
        cosines = []
        for i in range(k):
            a = torch.softmax(cfg.alpha * s_bar[i], dim=0)  # Eq. 8, over words
            e = (a[:, None] * t).sum(0)
            f_new = _gate(f[i], e, sam) if cfg.gate else f[i]  # Eq. 10
            cosines.append(F.cosine_similarity(f_new, e, dim=0))
        return torch.stack(cosines).mean()  # Eq. 12
    over = 1 if cfg.sim_norm == "query" else 0  # words (mirror) or regions (verbatim Eq. 6)
    s_bar = s / s.norm(dim=over, keepdim=True).clamp(min=1e-8)
    cosines = []
    for j in range(n):
        a = torch.softmax(cfg.alpha * s_bar[:, j], dim=0)  # Eq. 13, over regions
        e = (a[:, None] * f).sum(0)
        t_new = _gate(t[j], e, sam) if cfg.gate else t[j]  # Eq. 15
        cosines.append(F.cosine_similarity(t_new, e, dim=0))
    return torch.stack(cosines).mean()  # Eq. 17


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shapes_and_pairwise(name: str) -> None:
    model = small(name).eval()
    tokens, lengths = fake_text(5)
    with torch.no_grad():
        images = model.encode_image(fake_grid(3))
        texts = model.encode_text(tokens, lengths)
        sims = model.similarity(images, texts)
    assert tuple(images["regions"].shape) == (3, SIDE * SIDE, 32)
    assert tuple(texts["words"].shape) == (5, int(lengths.max()), 32)  # the chunk's longest caption
    assert torch.equal(texts["lengths"], lengths)
    assert tuple(sims.shape) == (3, 5) and torch.isfinite(sims).all()
    assert sims.abs().max() <= 1 + 1e-5  # a mean of cosines
    assert model.pairwise and model.image_inputs == ("map_mixed_7c",)
    # words past a caption's end are zero
    assert torch.all(texts["words"][1, int(lengths[1]):] == 0)


@pytest.mark.parametrize("overrides", [
    {"variant": "t2i"}, {"variant": "i2t"}, {"variant": "t2i", "gate": False}, {"variant": "i2t", "gate": False},
    {"variant": "t2i", "sim_norm": "regions"}, {"variant": "t2i", "alpha": 2.0},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_similarity_matches_equations_pair_by_pair(overrides: dict) -> None:
    model = small("dsan-t2i", **overrides).eval()
    with torch.no_grad():
        for p in model.sam.parameters():  # make the gate do something visible
            p.normal_(0, 0.3)
        tokens, lengths = fake_text(4, seed=1)
        images, texts = model.encode_image(fake_grid(3, seed=1)), model.encode_text(tokens, lengths)
        got = model.similarity(images, texts)
        for i in range(3):
            for j in range(4):
                want = reference_score(model, images["regions"][i], texts["words"][j, : int(lengths[j])])
                assert torch.allclose(got[i, j], want, atol=1e-5), (i, j)


def test_variants_and_gate_change_the_scores() -> None:
    tokens, lengths = fake_text(4)
    feats = fake_grid(3)
    scores = {}
    for key, overrides in {"t2i": {}, "i2t": {"variant": "i2t"}, "nogate": {"gate": False}}.items():
        model = small("dsan-t2i", **overrides).eval()
        with torch.no_grad():
            scores[key] = model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths))
    assert not torch.allclose(scores["t2i"], scores["i2t"], atol=1e-3)
    assert not torch.allclose(scores["t2i"], scores["nogate"], atol=1e-3)


def test_one_grid_cell_is_attended_entirely() -> None:
    """K = 1: every word's attended image feature e_j^r is that cell, so (no gate) S = mean_j cos(t_j, f)."""
    torch.manual_seed(0)
    dims = {"maps": {"mixed_7c": (CHANNELS, 1)}}
    model = create_model("dsan-t2i", dims, VOCAB, embed_dim=32, word_dim=16, gate=False).eval()
    tokens, lengths = fake_text(3)
    with torch.no_grad():
        images = model.encode_image(fake_grid(2, side=1))
        texts = model.encode_text(tokens, lengths)
        got = model.similarity(images, texts)
    for i in range(2):
        f = images["regions"][i, 0]
        for j in range(3):
            words = texts["words"][j, : int(lengths[j])]
            want = F.cosine_similarity(words, f[None], dim=-1).mean()
            assert torch.allclose(got[i, j], want, atol=1e-6)
    weights = attention_weights(torch.tensor([[[-0.3], [0.7]]]), torch.ones(1, 2, 1, dtype=torch.bool), 9.0, -2, False)
    assert torch.equal(weights, torch.ones(1, 2, 1))


def test_attention_by_hand() -> None:
    sig9 = 1 / (1 + math.exp(-9))
    # i2t, one region f = (1, 0), words (1, 0) and (0, 1): cosines (1, 0), Eq. 6 over the single
    # region leaves (1, 0), softmax of 9 × that gives (σ(9), 1 − σ(9)).
    sims = torch.tensor([[1.0, 0.0]])
    w = attention_weights(sims, torch.ones(1, 2, dtype=torch.bool), 9.0, norm_dim=-2, masked_softmax=True)
    assert torch.allclose(w, torch.tensor([[sig9, 1 - sig9]]), atol=1e-7)
    # a padded word gets no weight even when it is the most similar
    w = attention_weights(torch.tensor([[0.2, 0.9]]), torch.tensor([[True, False]]), 9.0, -2, True)
    assert torch.equal(w, torch.tensor([[1.0, 0.0]]))
    # t2i, two words × two regions, sims[word, region]
    sims = torch.tensor([[0.6, 0.3], [0.8, -0.2]])
    valid = torch.ones(2, 1, dtype=torch.bool)

    def softmax2(a: float, b: float) -> list[float]:
        return [math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))]

    # over words: region 1 column (0.6, 0.8) has norm 1; region 2 column (0.3, 0) → (1, 0)
    w = attention_weights(sims, valid, 9.0, norm_dim=-2, masked_softmax=False)
    assert torch.allclose(w, torch.tensor([softmax2(9 * 0.6, 9 * 1.0), softmax2(9 * 0.8, 0.0)]), atol=1e-6)
    # over regions: word 1 (0.6, 0.3) / √0.45, word 2 (0.8, 0) / 0.8
    w = attention_weights(sims, valid, 9.0, norm_dim=-1, masked_softmax=False)
    r = math.sqrt(0.45)
    assert torch.allclose(w, torch.tensor([softmax2(9 * 0.6 / r, 9 * 0.3 / r), softmax2(9.0, 0.0)]), atol=1e-6)
    # no positive similarity at all: uniform attention
    w = attention_weights(torch.tensor([[-0.5, -0.1, -0.9]]), torch.ones(1, 3, dtype=torch.bool), 9.0, -1, False)
    assert torch.allclose(w, torch.full((1, 3), 1 / 3))


def test_gated_update_by_hand() -> None:
    own = torch.tensor([2.0, -1.0])
    # g = σ(0) = 0.5, c = σ(0) = 0.5: 0.5 · own + 0.25
    assert torch.allclose(gated_update(own, torch.zeros(2), torch.zeros(2)), torch.tensor([1.25, -0.25]))
    # a closed gate keeps the feature, an open one replaces it by the memory cell σ(cell_pre)
    assert torch.allclose(gated_update(own, torch.full((2,), -50.0), torch.zeros(2)), own)
    cell = torch.tensor([1.0, -2.0])
    assert torch.allclose(gated_update(own, torch.full((2,), 50.0), cell), torch.sigmoid(cell))


@pytest.mark.parametrize("name", VARIANTS)
def test_scores_independent_of_batch_composition_and_tiling(name: str) -> None:
    model = small(name).eval()
    feats, (tokens, lengths) = fake_grid(5), fake_text(7)
    with torch.no_grad():
        full = model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths))
        for i in range(5):
            one_image = model.encode_image(take_rows(feats, slice(i, i + 1)))
            for j in (0, 3, 6):
                one_text = model.encode_text(tokens[j : j + 1, : int(lengths[j])], lengths[j : j + 1])
                assert torch.allclose(model.similarity(one_image, one_text)[0, 0], full[i, j], atol=1e-5)
        # text chunks encoded separately (different padded lengths) concatenate and score the same
        chunks = [model.encode_text(tokens[c : c + 3, : int(lengths[c : c + 3].max())], lengths[c : c + 3])
                  for c in range(0, 7, 3)]
        assert torch.allclose(model.similarity(model.encode_image(feats), concat_encodings(chunks)), full, atol=1e-5)
        model.sam.tile_elements = 1  # one pair per tile
        assert torch.allclose(model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths)), full, atol=1e-5)


def test_padding_tokens_do_not_matter() -> None:
    model = small().eval()
    tokens, lengths = fake_text(3)
    longer = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens, lengths)["words"], model.encode_text(longer, lengths)["words"])


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_finite_every_part_learns_and_loss_decreases(name: str) -> None:
    model = small(name)
    feats, (tokens, lengths) = fake_grid(8, seed=2), fake_text(8, seed=2)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])  # two captions of image 0: not negatives of each other

    def every_part_learns(model):
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            assert p.grad.abs().sum() > 0, pname

    losses = loss_curve(model, feats, tokens, lengths, ids, lr=2e-3, after_first_backward=every_part_learns)
    assert losses[-1] < 0.5 * losses[0], losses


def test_standardizer_fits_grid_channels() -> None:
    model = small()
    feats = fake_grid(20, seed=4)
    feats["map_mixed_7c"] = feats["map_mixed_7c"] * 3 + torch.arange(CHANNELS).view(1, -1, 1, 1)
    model.standardize.fit_chunk = 7  # accumulate over uneven chunks of images
    model.standardize.fit(feats)
    cells = grid_cells(feats["map_mixed_7c"]).reshape(-1, CHANNELS)
    assert torch.allclose(model.standardize.map_mixed_7c_mean, cells.mean(0), atol=1e-5)
    assert torch.allclose(model.standardize.map_mixed_7c_std, cells.std(0), atol=1e-5)
    out = model.standardize("map_mixed_7c", grid_cells(feats["map_mixed_7c"])).reshape(-1, CHANNELS)
    assert torch.allclose(out.mean(0), torch.zeros(CHANNELS), atol=1e-5)
    assert torch.allclose(out.std(0), torch.ones(CHANNELS), atol=1e-4)
    assert "standardize.map_mixed_7c_mean" in model.state_dict()


def test_grid_cells_layout() -> None:
    grid = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    cells = grid_cells(grid)
    assert tuple(cells.shape) == (2, 4, 3)
    assert torch.equal(cells[1, 2], grid[1, :, 1, 0])  # cell 2 = row 1, column 0


def test_shipped_configs_round_trip_and_build() -> None:
    for name, variant in (("dsan-t2i", "t2i"), ("dsan-i2t", "i2t")):
        spec = get_model_spec(name)
        assert spec.architecture == "dsan" and spec.backbone == "inception_v3"
        assert ModelSpec.from_dict(spec.to_dict()) == spec
        config = build_config(spec.architecture, spec.params)
        assert config == build_config(spec.architecture, ModelSpec.from_dict(spec.to_dict()).params)
        assert config == DsanConfig(variant=variant)
        assert spec.features["maps"] == ["mixed_7c:8"] and spec.features["num_regions"] == 0
        fspec = FeatureSpec(backbone=spec.backbone, **{**spec.features, "maps": tuple(spec.features["maps"])})
        assert fspec.image_size == 299
        assert feature_dims(fspec)["maps"] == {"mixed_7c": (2048, 8)}


def test_paper_defaults_and_parameter_count() -> None:
    c = DsanConfig()
    assert (c.variant, c.embed_dim, c.word_dim, c.alpha, c.gate, c.margin) == ("t2i", 2048, 300, 9.0, True, 0.2)
    model = create_model("dsan-t2i", {"maps": {"mixed_7c": (2048, 8)}}, 3000)
    d, w, v = 2048, 300, 3000
    gru = 2 * 3 * (w * d + d * d + 2 * d)
    expected = v * w + gru + (2048 * d + d) + 2 * (2 * d * d + d)
    assert model.num_parameters() == expected == 50_754_464


def test_bad_configuration_errors() -> None:
    with pytest.raises(ConfigError, match="mixed_7c"):
        create_model("dsan-t2i", {"maps": {}}, VOCAB, embed_dim=32, word_dim=16)
    with pytest.raises(ValueError, match="variant"):
        small(variant="both")
    with pytest.raises(ValueError, match="sim_norm"):
        small(sim_norm="words")
    with pytest.raises(ConfigError, match="alpha"):
        create_model("dsan-t2i", DIMS, VOCAB, temperature=9.0)
