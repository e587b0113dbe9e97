"""AMFMN: shapes of every variant, learning, pair independence, VGA formulas, dynamic margin, masks, plot."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import loss_curve, random_tokens
from rsitr.errors import ConfigError
from rsitr.losses import triplet_ranking_loss
from rsitr.models import create_model, get_model_spec
from rsitr.models.amfmn import (
    dynamic_margin,
)
from rsitr.models.base import TrainingCorpus, take_rows
from rsitr.models.registry import ModelSpec
from rsitr_train.plots import plot_salient_masks

FEATURE_DIMS = {
    "level_channels": [8, 16, 32, 64], "region_channels": 32, "num_regions": 0,
    "maps": {"layer1": (8, 8), "layer2": (16, 8), "layer3": (32, 4), "layer4": (64, 4)},
}
VOCAB = 40
ATTENTIONS = ("soft", "fusion", "sim")
TEXT_MODES = ("sentence", "keywords", "both")


def fake_features(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {f"level{i}": torch.randn(n, c, generator=g) for i, c in enumerate(FEATURE_DIMS["level_channels"], start=1)}
    for level, (channels, size) in FEATURE_DIMS["maps"].items():
        feats[f"map_{level}"] = torch.randn(n, channels, size, size, generator=g)
    return feats


def fake_text(n, seed=0):
    tokens, lengths = random_tokens(n, VOCAB, 2, 9, seed)
    keyword_tokens, keyword_lengths = random_tokens(n, VOCAB, 1, 4, seed + 100)
    return tokens, lengths, {"keyword_tokens": keyword_tokens, "keyword_lengths": keyword_lengths}


def small(name="amfmn-sim", **overrides):
    torch.manual_seed(0)
    return create_model(name, FEATURE_DIMS, VOCAB, embed_dim=32, word_dim=16, multiscale_channels=8, **overrides)


def rows_of(extras, j):
    return {k: v[j : j + 1, : int(extras["keyword_lengths"][j])] if k == "keyword_tokens" else v[j : j + 1]
            for k, v in extras.items()}


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("text_mode", TEXT_MODES)
def test_shapes_loss_and_gradients(attention, text_mode):
    model = small(attention=attention, text_mode=text_mode)
    feats, (tokens, lengths, extras) = fake_features(6), fake_text(6)
    images, texts = model.encode_image(feats), model.encode_text(tokens, lengths, **extras)
    assert images["visual"].shape == (6, 32)
    expected = {"sentence": ("sentence", "both"), "keywords": ("keywords", "both")}
    assert set(texts) == {key for key, modes in expected.items() if text_mode in modes}
    assert all(value.shape == (6, 32) for value in texts.values())
    assert model.similarity(images, {k: v[:4] for k, v in texts.items()}).shape == (6, 4)
    terms = model.training_loss(feats, tokens, lengths, torch.tensor([0, 0, 1, 2, 3, 4]), **extras)
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.word_embedding.weight.grad.abs().sum() > 0
    assert model.mvsa.low_conv.weight.grad.abs().sum() > 0
    assert model.pairwise


@pytest.mark.parametrize("overrides", [{"mvsa": False}, {"attention": "none"}, {"fusion_gate": False},
                                       {"sim_measure": "cosine"}, {"loss_reduction": "hardest"}, {"mask_channels": 3}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_ablation_switches_run(overrides):
    model = small(**overrides)
    feats, (tokens, lengths, extras) = fake_features(5), fake_text(5)
    loss = model.training_loss(feats, tokens, lengths, torch.arange(5), **extras)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
    assert model.pairwise == (overrides.get("attention", "sim") != "none")
    assert (model.mvsa is None) == (overrides.get("mvsa") is False)


def test_loss_decreases_on_a_tiny_batch():
    model = small()
    feats, (tokens, lengths, extras) = fake_features(8), fake_text(8)
    losses = loss_curve(model, feats, tokens, lengths, torch.arange(8), lr=1e-3, **extras)
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("attention", (*ATTENTIONS, "none"))
@pytest.mark.parametrize("text_mode", TEXT_MODES)
def test_scores_independent_of_batch_composition(attention, text_mode):
    model = small(attention=attention, text_mode=text_mode, pair_block=12).eval()  # several tiles
    feats, (tokens, lengths, extras) = fake_features(7), fake_text(9)
    with torch.no_grad():
        full = model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths, **extras))
        assert full.shape == (7, 9)
        for i in (0, 3, 6):
            image = model.encode_image(take_rows(feats, slice(i, i + 1)))
            for j in (0, 4, 8):
                text = model.encode_text(tokens[j : j + 1, : int(lengths[j])], lengths[j : j + 1], **rows_of(extras, j))
                assert torch.allclose(model.similarity(image, text)[0, 0], full[i, j], atol=1e-5)


def test_padding_does_not_matter():
    model = small().eval()
    tokens, lengths, extras = fake_text(4)
    more = {"keyword_tokens": torch.cat([extras["keyword_tokens"], torch.zeros(4, 3, dtype=torch.long)], dim=1),
            "keyword_lengths": extras["keyword_lengths"]}
    longer = torch.cat([tokens, torch.zeros(4, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        a, b = model.encode_text(tokens, lengths, **extras), model.encode_text(longer, lengths, **more)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def _direct_score(model, v, s, k):
    """cos(F_v, F_t) of one pair written out from Eq. 20–27."""
    vga, d = model.vga, v.shape[0]

    def guide(t):
        if vga.kind == "soft":
            return torch.sigmoid(vga.gate(v)) * t
        if vga.kind == "fusion":
            joint = torch.cat([v, t])
            return vga.value(joint) * torch.sigmoid(vga.gate(joint))
        f_v, f_t = vga.visual(v), vga.text(t)
        return torch.sigmoid(f_v * f_t) * f_t

    sv, kv = F.normalize(guide(s), dim=0), F.normalize(guide(k), dim=0)
    weight = torch.sigmoid(model.fusion.gate(torch.cat([sv, kv])))
    assert weight.shape == (d,)
    return F.cosine_similarity(v, weight * sv + (1 - weight) * kv, dim=0)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_pair_scores_match_the_equations(attention):
    model = small(attention=attention).eval()
    feats, (tokens, lengths, extras) = fake_features(3), fake_text(4)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths, **extras)
        got = model.similarity(images, texts)
        for i in range(3):
            for j in range(4):
                want = _direct_score(model, images["visual"][i], texts["sentence"][j], texts["keywords"][j])
                assert torch.allclose(got[i, j], want, atol=1e-5)


def test_cosine_similarity_attention_cancels_with_one_branch():
    """The literal cosine reading of Eq. 25 gates with one positive number, which the cosine score ignores."""
    model = small(attention="sim", sim_measure="cosine", text_mode="sentence").eval()
    feats, (tokens, lengths, _) = fake_features(3), fake_text(4)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths)
        plain = F.normalize(images["visual"], dim=-1) @ F.normalize(model.vga.text(texts["sentence"]), dim=-1).T
        assert torch.allclose(model.similarity(images, texts), plain, atol=1e-5)


def test_missing_keywords_fall_back_to_the_sentence():
    feats, (tokens, lengths, _) = fake_features(3), fake_text(4)
    both, sentence_only = small(text_mode="both").eval(), small(text_mode="sentence").eval()
    sentence_only.load_state_dict({k: v for k, v in both.state_dict().items() if k in sentence_only.state_dict()})
    keywords = small(text_mode="keywords").eval()
    with torch.no_grad():
        texts = both.encode_text(tokens, lengths)
        assert set(texts) == {"sentence"}
        got = both.similarity(both.encode_image(feats), texts)
        assert torch.allclose(got, sentence_only.similarity(sentence_only.encode_image(feats),
                                                            sentence_only.encode_text(tokens, lengths)), atol=1e-6)
        as_keywords = keywords.encode_text(tokens, lengths, keyword_tokens=tokens, keyword_lengths=lengths)
        assert torch.allclose(keywords.encode_text(tokens, lengths)["keywords"], as_keywords["keywords"])


def test_config_round_trip_and_yaml_features():
    from rsitr.features import FeatureSpec, feature_dims

    for name, attention in (("amfmn-soft", "soft"), ("amfmn-fusion", "fusion"), ("amfmn-sim", "sim")):
        spec = get_model_spec(name)
        assert spec.architecture == "amfmn" and spec.backbone == "resnet18" and spec.params["attention"] == attention
        assert ModelSpec.from_dict(spec.to_dict()) == spec
        dims = feature_dims(FeatureSpec(backbone=spec.backbone, **{k: tuple(v) if k == "maps" else v
                                                                   for k, v in spec.features.items()}))
        model = create_model(spec, dims, 100, embed_dim=16, word_dim=8, multiscale_channels=4)
        assert model.config.attention == attention
        assert sorted(model.standardize.keys) == ["level4", "map_layer1", "map_layer2", "map_layer3", "map_layer4"]
    model = create_model("amfmn-sim", {"level_channels": [64, 128, 256, 512], "region_channels": 256,
                                        "maps": {"layer1": (64, 16), "layer2": (128, 16), "layer3": (256, 8), "layer4": (512, 8)}}, 3000)
    c = model.config
    assert (c.embed_dim, c.word_dim, c.gamma, c.beta, c.text_mode) == (512, 300, 0.6, 5.0, "both")


def test_bad_config_and_missing_maps_raise():
    with pytest.raises(ValueError, match="text_mode"):
        small(text_mode="captions")
    with pytest.raises(ValueError, match="attention"):
        small(attention="cross")
    with pytest.raises(ConfigError, match="layer3"):
        create_model("amfmn-sim", {**FEATURE_DIMS, "maps": {"layer1": (8, 8), "layer2": (16, 8)}}, VOCAB)
    with pytest.raises(ConfigError, match="multiple"):
        create_model("amfmn-sim", {**FEATURE_DIMS, "maps": {**FEATURE_DIMS["maps"], "layer1": (8, 6), "layer2": (16, 6)}}, VOCAB)
    assert small(mvsa=False).num_parameters() > 0  # global feature only: maps not needed


# ---------------------------------------------------------------------------------- dynamic margin


def test_dynamic_margin_formula_by_hand():
    prior = torch.tensor([0.0, 0.5, 1.0, 0.2])
    # γ = 0.6, β = 5: 0.6 (e^5 − e^{5S}) / (e^5 − 1)
    e5 = 148.4131591025766
    want = torch.tensor([0.6, 0.6 * (e5 - 12.182493960703473) / (e5 - 1), 0.0, 0.6 * (e5 - math.e) / (e5 - 1)])
    assert torch.allclose(dynamic_margin(prior, 0.6, 5.0), want, atol=1e-6)
    assert torch.allclose(dynamic_margin(prior, 0.4, 0.0), 0.4 * (1 - prior))


def test_pair_margins_and_loss_use_the_prior_of_each_pair():
    table = {(10, 0): 0.9, (10, 1): 0.5, (11, 0): 0.25, (11, 1): 0.75, (12, 2): 0.9, (10, 2): 0.0,
             (11, 2): 0.1, (12, 0): 0.3, (12, 1): 0.0}

    def prior(caption_ids, image_ids):
        return np.array([[table[(int(c), int(i))] for i in image_ids] for c in caption_ids])

    model = small()
    image_ids, caption_ids = torch.tensor([0, 1, 2]), torch.tensor([10, 11, 12])
    assert torch.allclose(model.pair_margins(image_ids, caption_ids), torch.full((3, 3), 0.6))  # no prior yet
    model.prior = prior
    margins = model.pair_margins(image_ids, caption_ids)
    for i in range(3):
        for j in range(3):
            s = table[(10 + j, i)]  # caption j against image i
            assert margins[i, j].item() == pytest.approx(0.6 * (math.exp(5) - math.exp(5 * s)) / (math.exp(5) - 1), abs=1e-6)
    sims = torch.tensor([[0.9, 0.5, 0.2], [0.8, 0.7, 0.1], [0.3, 0.6, 0.4]])
    same = torch.eye(3, dtype=torch.bool)
    by_hand = 0.0
    for i in range(3):
        for j in range(3):
            if i != j:
                by_hand += max(0.0, margins[i, j].item() - sims[i, i].item() + sims[i, j].item())  # caption retrieval
                by_hand += max(0.0, margins[i, j].item() - sims[j, j].item() + sims[i, j].item())  # image retrieval
    assert triplet_ranking_loss(sims, same, margins).item() == pytest.approx(by_hand / 3, abs=1e-6)
    assert model.pair_margins(image_ids, None).eq(0.6).all()  # no caption ids: fixed margin


def test_prepare_training_builds_a_train_only_prior_kept_out_of_the_state():
    captions = ["two white planes near a terminal", "a plane parked near the terminal building",
                "green trees around a pond", "a pond surrounded by green trees",
                "two white planes near a terminal"]  # caption 4: a held-out copy of caption 0 on image 1
    corpus = TrainingCorpus(captions=captions, caption_image=np.array([0, 0, 1, 1, 1]),
                            train_caption_ids=np.array([0, 1, 2, 3]), vocab=None)
    model = small()
    before = set(model.state_dict())
    model.prepare_training(corpus)
    assert model.prior is not None and set(model.state_dict()) == before
    prior = model.prior(np.array([0, 2]), np.array([0, 1]))
    assert prior[0, 1] < 0.5 and prior[1, 1] > prior[1, 0]  # the held-out copy is no reference of image 1
    feats, (tokens, lengths, extras) = fake_features(4), fake_text(4)
    ids, captions_of = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    dynamic = model.training_loss(feats, tokens, lengths, ids, caption_ids=captions_of, **extras)
    fixed = model.training_loss(feats, tokens, lengths, ids, **extras)
    assert dynamic["margin"] < fixed["margin"] == pytest.approx(0.6)
    assert dynamic["loss"] <= fixed["loss"]
    off = small(dynamic_margin=False)
    off.prepare_training(corpus)
    assert off.prior is None


# ------------------------------------------------------------------------------ standardiser, mask


def test_map_standardizer_fits_channels_over_images_and_positions():
    model = small()
    feats = fake_features(30, seed=2)
    feats["map_layer2"] = feats["map_layer2"] * 4 + 7
    model.standardize.fit(feats)
    out = model.standardize("map_layer2", feats["map_layer2"])
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3)), torch.ones(16), atol=1e-4)
    assert model.standardize.map_layer2_mean.shape == (16,)
    assert "standardize.map_layer4_std" in model.state_dict()


def test_salient_mask_shape_range_and_dependence_on_the_image():
    model = small().eval()
    feats = fake_features(3)
    mask = model.salient_mask(feats)
    assert mask.shape == (3, 4, 4)
    assert (mask > 0).all() and (mask < 1).all()
    assert not torch.allclose(mask[0], mask[1])
    with pytest.raises(ValueError, match="mvsa"):
        small(mvsa=False).salient_mask(feats)


def test_plot_salient_masks_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), rng.integers(0, 255, (40, 24, 3), dtype=np.uint8)]
    path = plot_salient_masks(images, small().salient_mask(fake_features(2)), tmp_path / "masks.png", titles=["a", "b"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["masks.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match="one mask per image"):
        plot_salient_masks(images, np.zeros((1, 4, 4)), tmp_path / "bad.png")
