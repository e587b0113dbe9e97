"""ACF: shapes, training, pair independence, config, and the attention correction/filtering formulas."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn import functional as F

from helpers import loss_curve, random_tokens
from rsitr import evaluation
from rsitr.errors import ConfigError
from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec
from rsitr.models.acf import AcfConfig, AttentionScorer, as_nodes, correct_attention, filter_attention
from rsitr.models.base import take_rows
from rsitr.models.layers import FeatureStandardizer
from rsitr.models.registry import ModelSpec

MAP_CHANNELS = {"stage2": 12, "stage3": 16, "stage4": 20}
DIMS = {"level_channels": [8, 12, 16, 20], "maps": {level: (c, 7) for level, c in MAP_CHANNELS.items()}}
VOCAB = 50
DIM = 32


def fake_features(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feats = {f"map_{level}": torch.randn(n, c, 7, 7, generator=g) for level, c in MAP_CHANNELS.items()}
    feats["region_mask"] = torch.zeros(n, 0, dtype=torch.bool)  # the cache's empty region fields
    return feats


def fake_text(n: int, seed: int = 0, max_len: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    return random_tokens(n, VOCAB, 1, max_len - 1, seed)


def small(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("acf", DIMS, VOCAB, embed_dim=DIM, word_dim=16, **overrides)


# ----------------------------------------------------------------------------------------------
# Shapes, gradients, training


def test_encodings_and_scores_have_the_documented_shapes():
    model = small().eval()
    tokens, lengths = fake_text(5)
    with torch.no_grad():
        images = model.encode_image(fake_features(3))
        texts = model.encode_text(tokens, lengths)
        scores = model.similarity(images, texts)
    assert tuple(images["regions"].shape) == (3, 49, DIM) and tuple(images["global"].shape) == (3, DIM)
    assert tuple(texts["words"].shape) == (5, int(lengths.max()), DIM)  # the chunk's longest caption
    assert tuple(texts["global"].shape) == (5, DIM) and torch.equal(texts["lengths"], lengths)
    assert tuple(scores.shape) == (3, 5) and torch.isfinite(scores).all()
    assert model.pairwise
    assert model.image_inputs == ("map_stage2", "map_stage3", "map_stage4")


ABLATIONS = [{}, {"gat": False}, {"fusion": False}, {"correction": False}, {"filtering": False},
             {"global_loss": False}, {"filter_rule": "ratio"}, {"filter_reweight": False},
             {"loss_reduction": "hardest"}]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "full")
def test_forward_backward_finite(overrides):
    model = small(**overrides)
    tokens, lengths = fake_text(6)
    terms = model.training_loss(fake_features(6), tokens, lengths, torch.tensor([0, 0, 1, 2, 3, 4]))
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    assert ("global" in terms) == model.config.global_loss
    terms["loss"].backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), name
    assert model.word_embedding.weight.grad.abs().sum() > 0
    assert model.nodes.top.weight.grad.abs().sum() > 0
    if model.config.fusion:
        assert model.nodes.fuse.weight.grad.abs().sum() > 0
    if model.config.gat:
        assert model.gat.attend_src.grad.abs().sum() > 0
    else:
        assert model.gat is None


def test_loss_decreases_on_a_tiny_batch():
    model = small()
    feats, (tokens, lengths) = fake_features(8), fake_text(8)
    losses = loss_curve(model, feats, tokens, lengths, torch.arange(8), lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.3 * losses[0]


def test_captions_of_one_image_are_not_negatives():
    """Two identical captions of one image: swapping them must not change the loss (no self-contrast)."""
    model = small().eval()
    feats = fake_features(4)
    tokens, lengths = fake_text(4)
    tokens[1], lengths[1] = tokens[0], lengths[0]
    with torch.no_grad():
        together = model.training_loss(feats, tokens, lengths, torch.tensor([0, 0, 1, 2]))["loss"]
        apart = model.training_loss(feats, tokens, lengths, torch.tensor([0, 1, 2, 3]))["loss"]
    assert together < apart


# ----------------------------------------------------------------------------------------------
# Pair independence and the scoring shortcut


@pytest.mark.parametrize("overrides", [{}, {"correction": False}, {"filtering": False}, {"pair_block": 3}])
def test_scores_independent_of_batch_composition(overrides):
    model = small(**overrides).eval()
    feats, (tokens, lengths) = fake_features(7), fake_text(9)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths)
        full = model.similarity(images, texts)
        assert full.shape == (7, 9)
        shuffled = torch.randperm(9, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(model.similarity(images, take_rows(texts, shuffled)), full[:, shuffled], atol=1e-5)
        for i in (0, 3, 6):
            one_image = model.encode_image(take_rows(feats, slice(i, i + 1)))
            for j in (0, 4, 8):
                one_text = model.encode_text(tokens[j : j + 1, : int(lengths[j])], lengths[j : j + 1])
                assert torch.allclose(model.similarity(one_image, one_text)[0, 0], full[i, j], atol=1e-5)


def test_padding_tokens_do_not_matter():
    model = small().eval()
    feats, (tokens, lengths) = fake_features(2), fake_text(4)
    longer = torch.cat([tokens, torch.zeros(4, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        images = model.encode_image(feats)
        a, b = model.encode_text(tokens, lengths), model.encode_text(longer, lengths)
        assert torch.allclose(a["words"], b["words"], atol=1e-6)
        assert torch.allclose(model.similarity(images, a), model.similarity(images, b), atol=1e-6)


def _reference_score(model, regions, global_image, words, global_text) -> float:
    """Eq. 5–14 for one pair written out directly, with explicit attended vectors."""
    c = model.config
    sim_g = F.cosine_similarity(global_image, global_text, dim=0)
    factor = sim_g - c.p if c.correction else torch.tensor(1.0)
    cos = F.normalize(regions, dim=-1) @ F.normalize(words, dim=-1).T  # (k, m), Eq. 5
    positive = cos.clamp(min=0)

    def refine(alpha):  # rows are the attending fragments
        corrected = factor * alpha / (factor * alpha).sum(dim=1, keepdim=True)  # Eq. 8–9: α' = α, unit mass
        keep = corrected.max(dim=1, keepdim=True).values - corrected < c.q  # Eq. 10 on α'
        kept = corrected * corrected * keep  # Eq. 11 as printed: α' · H(α')
        return kept / kept.sum(dim=1, keepdim=True)

    alpha_t = torch.softmax(c.lambda_softmax * positive / positive.norm(dim=0, keepdim=True).clamp(min=1e-8), dim=1)
    attended_words = refine(alpha_t) @ words  # Eq. 12, one vector per region
    image_to_text = F.cosine_similarity(regions, attended_words, dim=1).mean()
    alpha_v = torch.softmax(c.lambda_softmax * positive / positive.norm(dim=1, keepdim=True).clamp(min=1e-8), dim=0)
    attended_regions = refine(alpha_v.T) @ regions  # Eq. 13, one vector per word
    text_to_image = F.cosine_similarity(attended_regions, words, dim=1).mean()
    return float(factor * (image_to_text + text_to_image))


@pytest.mark.parametrize("overrides", [{}, {"correction": False}])
def test_tiled_gram_scoring_equals_the_direct_formula(overrides):
    model = small(**overrides).eval()
    feats, (tokens, lengths) = fake_features(3, seed=2), fake_text(4, seed=2)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths)
        scores = model.similarity(images, texts)
        for i in range(3):
            for j in range(4):
                words = texts["words"][j, : int(lengths[j])]
                expected = _reference_score(model, images["regions"][i], images["global"][i], words, texts["global"][j])
                assert scores[i, j].item() == pytest.approx(expected, abs=1e-5)


def test_correction_scales_the_local_score_by_global_similarity():
    """Without filtering, correction multiplies each pair's Eq. 14 score by sim_g − p exactly."""
    corrected, plain = small(filtering=False).eval(), small(filtering=False, correction=False).eval()
    plain.load_state_dict(corrected.state_dict())
    feats, (tokens, lengths) = fake_features(4), fake_text(5)
    with torch.no_grad():
        images, texts = corrected.encode_image(feats), corrected.encode_text(tokens, lengths)
        sim_g = F.normalize(images["global"], dim=-1) @ F.normalize(texts["global"], dim=-1).T
        got = corrected.similarity(images, texts)
        assert torch.allclose(got, (sim_g - 0.3) * plain.similarity(images, texts), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Eq. 7–11 by hand


def test_correction_by_hand_around_threshold_p():
    alpha = torch.tensor([[0.5, 0.3, 0.2]])
    for sim_g, mass in ((0.5, 0.2), (0.3, 0.0), (0.2, -0.1)):  # above p, at p, below p (sign flips)
        weights, got_mass = correct_attention(alpha, torch.tensor(sim_g), p=0.3)
        assert torch.allclose(weights, alpha)  # Eq. 9: (sim_g − p) α / Σ (sim_g − p) α = α
        assert got_mass.item() == pytest.approx(mass, abs=1e-7)
    # unnormalised input: Eq. 9 gives unit mass (here the row sums to 2)
    assert torch.allclose(correct_attention(2 * alpha, torch.tensor(0.5), p=0.3)[0], alpha)
    # one global similarity per pair, broadcast over the pair's attention matrix
    weights, mass = correct_attention(alpha.expand(2, 1, 3), torch.tensor([0.9, 0.3])[:, None, None], p=0.3)
    assert torch.allclose(weights, alpha.expand(2, 1, 3))
    assert torch.allclose(mass.flatten(), torch.tensor([0.6, 0.0]))


def test_filtering_by_hand():
    weights = torch.tensor([[0.45, 0.40, 0.10, 0.05]])
    # Eq. 10: |α − max| < 0.1 keeps 0.45 and 0.40; Eq. 11 as printed renormalises α · H(α) = α²
    squared = filter_attention(weights, q=0.1)
    assert torch.allclose(squared, torch.tensor([[0.2025, 0.16, 0.0, 0.0]]) / 0.3625)
    linear = filter_attention(weights, q=0.1, reweight=False)
    assert torch.allclose(linear, torch.tensor([[0.45, 0.40, 0.0, 0.0]]) / 0.85)
    # a larger q keeps more: 0.45 − 0.10 = 0.35 < 0.38 < 0.45 − 0.05
    assert torch.allclose(filter_attention(weights, q=0.38, reweight=False),
                          torch.tensor([[0.45, 0.40, 0.10, 0.0]]) / 0.95)
    # "ratio" reading: keep α ≥ q · max = 0.09
    assert torch.allclose(filter_attention(weights, q=0.2, rule="ratio", reweight=False),
                          torch.tensor([[0.45, 0.40, 0.10, 0.0]]) / 0.95)
    # padding is never kept, even when it holds weight
    valid = torch.tensor([[True, False, True, True]])
    assert torch.allclose(filter_attention(weights, q=0.38, valid=valid, reweight=False),
                          torch.tensor([[0.45, 0.0, 0.10, 0.0]]) / 0.55)
    # ... also when every valid weight is within q of the maximum
    uniform = torch.tensor([[0.05, 0.05, 0.05]])
    assert torch.allclose(filter_attention(uniform, q=0.1, valid=torch.tensor([[True, True, False]])),
                          torch.tensor([[0.5, 0.5, 0.0]]))
    # the filter runs along any dimension
    assert torch.allclose(filter_attention(weights.T, q=0.1, dim=0), squared.T)


def test_filtering_after_correction_reads_the_unit_mass_weights():
    """q filters α' of Eq. 9 (unit mass), whatever the pair's global similarity, p included."""
    alpha = torch.tensor([[0.45, 0.40, 0.10, 0.05]])
    # Eq. 10 with q = 0.1: 0.45 − 0.40 = 0.05 < 0.1 keeps two words; 0.45 − 0.10 = 0.35 drops the rest.
    # Eq. 11 as printed renormalises the squares: 0.45² = 0.2025, 0.40² = 0.16, sum 0.3625.
    expected = torch.tensor([[0.2025, 0.16, 0.0, 0.0]]) / 0.3625
    scorer = AttentionScorer(AcfConfig())  # p = 0.3, q = 0.1, difference rule, reweight
    for sim_g in (0.3, 0.3001, 0.5, 0.9, -0.5):  # at p, just above it, above it, far above, below it
        refined = scorer.refine(alpha, torch.tensor(sim_g), -1, None)
        assert torch.allclose(refined, expected, atol=1e-6), sim_g
    # the same along the region axis (text-to-image), with padding masked out
    valid = torch.tensor([[True], [False], [True], [True]])
    refined = scorer.refine(alpha.T, torch.tensor(0.3), -2, valid)
    assert torch.allclose(refined.T, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-6)  # 0.45 − 0.10 ≥ q
    # the "ratio" rule on α': keep α' ≥ 0.2 · 0.45 = 0.09, also at sim_g = p
    ratio = AttentionScorer(AcfConfig(q=0.2, filter_rule="ratio", filter_reweight=False))
    assert torch.allclose(ratio.refine(alpha, torch.tensor(0.3), -1, None),
                          torch.tensor([[0.45, 0.40, 0.10, 0.0]]) / 0.95, atol=1e-6)
    # without filtering the weights are α itself; without correction the filter reads α directly
    assert torch.equal(AttentionScorer(AcfConfig(filtering=False)).refine(alpha, torch.tensor(0.3), -1, None), alpha)
    plain = AttentionScorer(AcfConfig(correction=False)).refine(alpha, torch.tensor(0.3), -1, None)
    assert torch.allclose(plain, expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Configuration, features, standardisation


def test_config_defaults_are_the_papers():
    c = AcfConfig()
    assert (c.p, c.q, c.margin, c.embed_dim, c.word_dim) == (0.3, 0.1, 0.2, 512, 300)
    assert c.correction and c.filtering and c.gat and c.fusion and c.global_loss
    with pytest.raises(ValueError, match="filter_rule"):
        AcfConfig(filter_rule="max")


def test_shipped_config_round_trip_and_feature_spec():
    spec = get_model_spec("acf")
    assert spec.architecture == "acf" and spec.backbone == "pvig_s"
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    assert spec.params["p"] == 0.3 and spec.params["q"] == 0.1
    features = FeatureSpec(backbone=spec.backbone, **{**spec.features, "maps": tuple(spec.features["maps"])})
    dims = feature_dims(features)
    assert dims["maps"] == {"stage2": (160, 7), "stage3": (400, 7), "stage4": (640, 7)}
    model = create_model(spec, dims, 3000)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(AcfConfig())
    changed = spec.with_overrides({"q": 0.3, "filtering": False})
    again = ModelSpec.from_dict(changed.to_dict())
    assert again == changed and create_model(again, dims, 3000).config.q == 0.3


def test_missing_maps_are_clear_errors():
    with pytest.raises(ConfigError, match="stage3"):
        create_model("acf", {"maps": {"stage2": (12, 7), "stage4": (20, 7)}}, VOCAB)
    with pytest.raises(ConfigError, match="sizes"):
        create_model("acf", {"maps": {"stage2": (12, 14), "stage3": (16, 7), "stage4": (20, 7)}}, VOCAB)


def test_node_standardizer_fits_every_node_and_ignores_region_mask():
    std = FeatureStandardizer({"map_stage2": 12}, moments="std_mean")
    feats = fake_features(20, seed=3)
    feats["map_stage2"] = feats["map_stage2"] * 3 + torch.arange(12.0)[None, :, None, None]
    std.fit(feats)
    nodes = as_nodes(std("map_stage2", feats["map_stage2"]))
    assert tuple(nodes.shape) == (20, 49, 12)
    flat = nodes.reshape(-1, 12)
    assert torch.allclose(flat.mean(0), torch.zeros(12), atol=1e-5)
    assert torch.allclose(flat.std(0), torch.ones(12), atol=1e-5)
    # node i of the output is pixel (i // 7, i % 7) of the map
    raw = (feats["map_stage2"][4, :, 2, 5] - std.map_stage2_mean) / std.map_stage2_std
    assert torch.allclose(nodes[4, 2 * 7 + 5], raw, atol=1e-6)
    assert "standardize.map_stage4_mean" in small().state_dict()


def test_head_parameter_count_with_paper_dimensions():
    """Default config, vocabulary 3000, pvig_s maps: embedding, BiGRU, GAT, fusion and projection."""
    model = create_model("acf", {"maps": {"stage2": (160, 7), "stage3": (400, 7), "stage4": (640, 7)}}, 3000)
    d, words = 512, 300
    gru = 2 * 3 * (words * d + d * d + 2 * d)
    gat = d * d + 2 * d
    expected = 3000 * words + gru + gat + (560 * d + d) + (640 * d + d)
    assert model.num_parameters() == expected


def test_trains_and_evaluates_end_to_end_on_cached_vig_maps(tiny_synth, tmp_path, monkeypatch):
    """The real path: pvig_s maps cached from the shipped YAML, trainer-fitted standardiser, chunked scoring."""
    from rsitr_train.config import load_config
    from rsitr_train.runs import evaluate_run, load_run
    from rsitr_train.trainer import train

    overrides = [
        f"data.path={tiny_synth}", f"features.cache_dir={tmp_path / 'cache'}", "features.precision=fp32",
        "model.name=acf", "model.params={embed_dim: 32, word_dim: 16}", "model.features={image_size: 64}",
        "train.epochs=1", "train.batch_size=16", "train.lr=0.001",
    ]
    run = tmp_path / "run"
    summary = train(load_config(None, overrides), run, progress=False)
    assert summary["best_epoch"] == 1
    model, prepared = load_run(run, progress=False)
    assert set(prepared.features.maps) == {"map_stage2", "map_stage3", "map_stage4"}
    assert tuple(prepared.features.maps["map_stage4"].shape[1:]) == (640, 7, 7)
    assert model.standardize.map_stage4_std.ne(1).any()  # fitted on the training split, restored from the checkpoint
    results = []
    for chunk in (3, 512):  # encoding chunks and scoring blocks of 3 items, then of 512
        with monkeypatch.context() as patch:
            for constant in ("ENCODE_CHUNK", "SCORE_IMAGE_BLOCK", "SCORE_CAPTION_BLOCK"):
                patch.setattr(evaluation, constant, chunk)
            results.append(evaluate_run(run, "test", tmp_path / f"eval{chunk}.json", progress=False)["metrics"])
    assert results[0] == results[1]
