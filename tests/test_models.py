"""DOVE and DOVE-S: forward, backward, finite gradients, batch independence, ablation switches."""

import pytest
import torch
from torch.nn import functional as F

from helpers import loss_curve, random_tokens
from rsitr.errors import ConfigError, UnknownModelError
from rsitr.models import create_model, get_model_spec, list_models
from rsitr.models.base import take_rows

FEATURE_DIMS = {"level_channels": [8, 16, 32, 64], "region_channels": 32}
VOCAB = 50


def fake_features(n, regions=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {f"level{i}": torch.randn(n, c, generator=g) for i, c in enumerate(FEATURE_DIMS["level_channels"], start=1)}
    feats["regions"] = torch.randn(n, regions, FEATURE_DIMS["region_channels"], generator=g)
    mask = torch.ones(n, regions, dtype=torch.bool)
    mask[0, regions // 2 :] = False  # padded boxes on the first image
    feats["region_mask"] = mask
    return feats


def fake_text(n, seed=0):
    return random_tokens(n, VOCAB, 2, 8, seed)


def small(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, FEATURE_DIMS, VOCAB, embed_dim=32, word_dim=16, **overrides)


ABLATIONS = [
    {},
    {"dtga": "none"}, {"dtga": "ff"}, {"dtga": "bb"}, {"dtga": "mean"},
    {"ifa": False}, {"iga": False},
    {"ifa_head": "nonlinear", "iga_head": "linear"}, {"ifa_head": "linear", "iga_head": "linear"},
]


DOVE_MODELS = [name for name in list_models() if get_model_spec(name).architecture == "dove"]


@pytest.mark.parametrize("name", DOVE_MODELS)
@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "full")
def test_forward_backward_finite(name, overrides):
    model = small(name, **overrides)
    tokens, lengths = fake_text(6)
    terms = model.training_loss(fake_features(6), tokens, lengths, torch.tensor([0, 0, 1, 2, 3, 4]))
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    for pname, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), pname
    # the parts that must learn do get gradient
    assert model.word_embedding.weight.grad.abs().sum() > 0
    assert model.msv.projections[0].weight.grad.abs().sum() > 0


SCORE_VARIANTS = ABLATIONS[:1] + [{"iga": False}, {"iga_head": "linear"}, {"test_score": "final+global"},
                                  {"iga": False, "test_score": "final+global"}]


@pytest.mark.parametrize("overrides", SCORE_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "full")
def test_scores_independent_of_batch_composition(overrides):
    model = small("dove", **overrides).eval()
    feats, (tokens, lengths) = fake_features(7), fake_text(9)
    with torch.no_grad():
        images = model.encode_image(feats)
        texts = model.encode_text(tokens, lengths)
        full = model.similarity(images, texts)
        assert full.shape == (7, 9)
        for i in range(7):
            one_image = model.encode_image(take_rows(feats, slice(i, i + 1)))
            for j in (0, 4, 8):
                one_text = model.encode_text(tokens[j : j + 1, : int(lengths[j])], lengths[j : j + 1])
                assert torch.allclose(model.similarity(one_image, one_text)[0, 0], full[i, j], atol=1e-5)


@pytest.mark.parametrize("n_texts", [4, 12], ids=["few captions: flat product", "batched product"])
def test_pairwise_iga_matches_direct_formula(n_texts):
    """The factorised IGA equals Eq. 26–28 written out pair by pair, on both paths of its head."""
    model = small("dove").eval()
    feats, (tokens, lengths) = fake_features(3), fake_text(n_texts)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths)
        got = model.similarity(images, texts)
        iga = model.iga
        for i in range(3):
            for j in range(n_texts):
                r = iga.regional(images["region_mean"][i])
                g = iga.textual(texts["global"][j])
                s = torch.sigmoid(r @ g / 32**0.5)
                t = iga.head(s * g + r)
                assert torch.allclose(got[i, j], F.cosine_similarity(t, images["visual"][i], dim=0), atol=1e-5)


@pytest.mark.parametrize("iga", [True, False])
def test_final_plus_global_adds_the_global_cosine_with_weight_one(iga):
    """test_score=final+global is cos(V_MR, T_RG) + cos(V_M, T_G), each written out pair by pair."""
    final = small("dove", iga=iga).eval()
    both = small("dove", iga=iga, test_score="final+global").eval()
    both.load_state_dict(final.state_dict())
    feats, (tokens, lengths) = fake_features(3), fake_text(4)
    with torch.no_grad():
        images, texts = final.encode_image(feats), final.encode_text(tokens, lengths)
        got = both.similarity(images, texts)
        plain = final.similarity(images, texts)
        for i in range(3):
            for j in range(4):
                if iga:
                    r = final.iga.regional(images["region_mean"][i])
                    g = final.iga.textual(texts["global"][j])
                    t_rg = final.iga.head(torch.sigmoid(r @ g / 32**0.5) * g + r)  # Eq. 26–28
                else:
                    t_rg = texts["global"][j]  # w/o IGA the final text embedding is T_G
                cos_final = F.cosine_similarity(images["visual"][i], t_rg, dim=0)
                cos_global = F.cosine_similarity(images["global"][i], texts["global"][j], dim=0)  # V_M, T_G (Eq. 29)
                assert torch.allclose(plain[i, j], cos_final, atol=1e-5)
                assert torch.allclose(got[i, j], cos_final + cos_global, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the global term really is there


def test_test_score_does_not_change_the_training_loss():
    """Eq. 31 trains both settings alike: the final term is cos(V_MR, T_RG) whatever ranks at test."""
    final = small("dove")
    both = small("dove", test_score="final+global")
    both.load_state_dict(final.state_dict())
    feats, (tokens, lengths) = fake_features(6), fake_text(6)
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    a = final.training_loss(feats, tokens, lengths, ids)
    b = both.training_loss(feats, tokens, lengths, ids)
    for key in ("loss", "final", "global"):
        assert torch.equal(a[key], b[key]), key


def test_test_score_default_and_configs():
    assert small("dove").config.test_score == "final"
    for name in DOVE_MODELS:
        assert get_model_spec(name).params["test_score"] == "final"
    with pytest.raises(ValueError, match="test_score"):
        small("dove", test_score="global")


def test_padded_regions_do_not_matter():
    model = small("dove").eval()
    feats = fake_features(2)
    changed = {k: v.clone() for k, v in feats.items()}
    changed["regions"][0, 3:] = 100.0  # image 0's regions 3.. are masked out
    with torch.no_grad():
        a, b = model.encode_image(feats), model.encode_image(changed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_padding_tokens_do_not_matter():
    model = small("dove").eval()
    tokens, lengths = fake_text(3)
    longer = torch.cat([tokens, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(tokens, lengths)["global"], model.encode_text(longer, lengths)["global"], atol=1e-6)


def test_iga_off_is_separable_and_on_is_pairwise():
    assert small("dove").pairwise
    assert not small("dove", iga=False).pairwise


def test_loss_decreases_on_a_tiny_batch():
    model = small("dove")
    feats, (tokens, lengths) = fake_features(8), fake_text(8)
    losses = loss_curve(model, feats, tokens, lengths, torch.arange(8), lr=1e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_registry_errors_and_config_round_trip(tmp_path):
    with pytest.raises(UnknownModelError, match="dove"):
        get_model_spec("no-such-model")
    with pytest.raises(ConfigError, match="embed_dim"):
        create_model("dove", FEATURE_DIMS, VOCAB, embed_size=3)
    spec = get_model_spec("dove-s")
    assert spec.backbone == "resnet18" and spec.params["embed_dim"] == 512
    path = tmp_path / "mine.yaml"
    path.write_text("architecture: dove\nbackbone: resnet18\nparams:\n  embed_dim: 64\n  dtga: none\n")
    mine = get_model_spec(path)
    assert mine.name == "mine" and mine.params == {"embed_dim": 64, "dtga": "none"}
    model = create_model(mine, FEATURE_DIMS, VOCAB)
    assert model.config.embed_dim == 64 and model.dtga is None
    assert type(spec).from_dict(spec.to_dict()) == spec


def test_paper_defaults():
    model = create_model("dove", {"level_channels": [256, 512, 1024, 2048], "region_channels": 1024}, 1000)
    c = model.config
    assert (c.embed_dim, c.margin, c.lambda_g, c.attention_heads, c.ifa_head, c.iga_head) == (512, 0.2, 10.0, 2, "linear", "nonlinear")


def test_feature_standardizer_uses_given_statistics_and_masks_padding():
    from rsitr.models.layers import FeatureStandardizer

    std = FeatureStandardizer({"level1": 8, "regions": 32})
    feats = fake_features(20, seed=1)
    feats["level1"] = feats["level1"] * 3 + 5
    feats["regions"][0, 3:] = 1e4  # padded regions of image 0 must not enter the statistics
    std.fit(feats)
    out = std("level1", feats["level1"])
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(out.std(0), torch.ones(8), atol=1e-5)
    assert std.regions_mean.abs().max() < 5
    assert "standardize.level1_mean" in small("dove").state_dict()


def test_concat_encodings_zero_pads_word_widths():
    from rsitr.models.base import concat_encodings

    g = torch.Generator().manual_seed(0)
    a = {"emb": torch.randn(2, 4, generator=g), "lengths": torch.tensor([3, 1])}
    b = {"emb": torch.randn(3, 4, generator=g), "lengths": torch.tensor([2, 2, 1])}
    same = concat_encodings([a, b])  # equal trailing shapes: plain concatenation
    assert torch.equal(same["emb"], torch.cat([a["emb"], b["emb"]]))
    assert torch.equal(same["lengths"], torch.tensor([3, 1, 2, 2, 1]))  # 1-D tensors concatenate
    narrow = {"words": torch.randn(2, 3, 5, generator=g), "mask": torch.ones(2, 3, dtype=torch.bool)}
    wide = {"words": torch.randn(1, 7, 5, generator=g), "mask": torch.ones(1, 7, dtype=torch.bool)}
    joined = concat_encodings([narrow, wide, narrow])
    assert joined["words"].shape == (5, 7, 5) and joined["mask"].shape == (5, 7)
    assert joined["words"].dtype == torch.float32 and joined["mask"].dtype == torch.bool
    assert torch.equal(joined["words"][:2, :3], narrow["words"]) and torch.equal(joined["words"][2], wide["words"][0])
    assert torch.equal(joined["words"][3:, :3], narrow["words"])
    assert torch.all(joined["words"][:2, 3:] == 0) and torch.all(joined["words"][3:, 3:] == 0)
    assert not joined["mask"][:2, 3:].any() and joined["mask"][2].all() and joined["mask"][:2, :3].all()
    with pytest.raises(ValueError, match="words"):  # a mismatch beyond dimension 1 is an error
        concat_encodings([narrow, {"words": torch.randn(1, 3, 6), "mask": torch.ones(1, 3, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="words"):  # so is a different number of dimensions
        concat_encodings([narrow, {"words": torch.randn(1, 3), "mask": torch.ones(1, 3, dtype=torch.bool)}])


@pytest.mark.parametrize("overrides", SCORE_VARIANTS[:4])
def test_bf16_scores_are_finished_in_float32(overrides):
    """Under bf16 autocast the encoders run in bf16 but the score is not rounded to bf16's 8 bits."""
    model = small("dove", **overrides).eval()
    feats, (tokens, lengths) = fake_features(40, seed=1), fake_text(50, seed=1)
    with torch.no_grad():
        reference = model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths))
    assert scores.dtype == torch.float32
    assert (scores - reference).abs().max() < 0.05  # bf16 encodings: close to fp32, not equal
    # bf16 has 256 steps per octave, so 40 cosines in [-1, 1] rounded to it would often collide;
    # float32 scores of distinct pairs do not
    assert all(len(torch.unique(column)) == 40 for column in scores.T)
    rounded = scores.to(torch.bfloat16)
    assert any(len(torch.unique(column)) < 40 for column in rounded.T)  # the check can fail
