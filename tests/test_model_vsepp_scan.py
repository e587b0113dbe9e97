"""VSE++ and SCAN (t2i, i2t): shapes, learning, batch independence, padding, configs, hand-checked scores."""

import pytest
import torch
from torch.nn import functional as F

from helpers import loss_curve
from rsitr import evaluation
from rsitr.evaluation import compute_similarity
from rsitr.models import ModelSpec, create_model, get_model_spec
from rsitr.models.base import take_rows
from rsitr.models.registry import get_model_reference

FEATURE_DIMS = {"level_channels": [8, 16, 32, 64], "region_channels": 32, "num_regions": 6}
PAPER_DIMS = {"level_channels": (256, 512, 1024, 2048), "region_channels": 1024, "num_regions": 36}
VOCAB = 50
VSEPP_NAMES = ["vsepp", "vsepp-dove-encoders"]
NAMES = [*VSEPP_NAMES, "scan-t2i", "scan-i2t"]
EMBED = 32


def fake_features(n, regions=6, seed=0):
    """Random cached features; image 0 has its second half of boxes padded (zero, masked)."""
    g = torch.Generator().manual_seed(seed)
    feats = {f"level{i}": torch.randn(n, c, generator=g) for i, c in enumerate(FEATURE_DIMS["level_channels"], start=1)}
    feats["regions"] = torch.randn(n, regions, FEATURE_DIMS["region_channels"], generator=g)
    mask = torch.ones(n, regions, dtype=torch.bool)
    mask[0, regions // 2 :] = False
    feats["regions"][0, regions // 2 :] = 0.0
    if n > 2:
        mask[2, 1:] = False  # an image with a single real box
        feats["regions"][2, 1:] = 0.0
    feats["region_mask"] = mask
    return feats


def fake_text(n, seed=0):
    """Padded captions of lengths 2..8 (token 0 = padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (n,), generator=g)
    lengths[0] = 8  # at least one full-width caption, so shorter ones really are padded
    tokens = torch.randint(1, VOCAB, (n, int(lengths.max())), generator=g)
    tokens[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


def small(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, FEATURE_DIMS, VOCAB, embed_dim=EMBED, word_dim=16, **overrides)


def scores(model, feats, tokens, lengths):
    with torch.no_grad():
        return model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths))


# --- shapes, gradients, learning -------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes(name):
    model = small(name).eval()
    feats, (tokens, lengths) = fake_features(5), fake_text(7)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths)
        sims = model.similarity(images, texts)
    assert all(v.shape[0] == 5 for v in images.values())
    assert all(v.shape[0] == 7 for v in texts.values())
    assert sims.shape == (5, 7) and torch.isfinite(sims).all()
    if name in VSEPP_NAMES:
        assert images["embedding"].shape == (5, EMBED) and texts["embedding"].shape == (7, EMBED)
        assert torch.allclose(images["embedding"].norm(dim=-1), torch.ones(5), atol=1e-5)
        assert not model.pairwise
    else:
        assert images["regions"].shape == (5, 6, EMBED)
        assert texts["words"].shape == (7, int(lengths.max()), EMBED)  # the chunk's longest caption
        assert model.pairwise
    assert sims.abs().max() <= 1.0 + 1e-5  # cosines, and LSE/mean of cosines stays near that range


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_finite_with_gradients_and_decreases(name):
    model = small(name)
    feats, (tokens, lengths) = fake_features(8), fake_text(8)

    def check_first_gradients(model):
        for pname, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), pname
        assert model.word_embedding.weight.grad.abs().sum() > 0
        assert model.word_embedding.weight.grad[0].abs().sum() == 0  # padding row never learns

    losses = loss_curve(model, feats, tokens, lengths, torch.arange(8), lr=2e-3,
                        after_first_backward=check_first_gradients)
    assert losses[-1] < 0.5 * losses[0], losses


# --- evaluation invariances ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_scores_independent_of_batch_composition(name):
    model = small(name).eval()
    feats, (tokens, lengths) = fake_features(5), fake_text(9)
    full = scores(model, feats, tokens, lengths)
    for i in range(5):
        for j in (0, 3, 8):
            one_text = (tokens[j : j + 1, : int(lengths[j])], lengths[j : j + 1])
            alone = scores(model, take_rows(feats, slice(i, i + 1)), *one_text)
            assert torch.allclose(alone[0, 0], full[i, j], atol=1e-5), (i, j)


@pytest.mark.parametrize("name", NAMES)
def test_blockwise_evaluation_equals_one_block(name, monkeypatch):
    """The evaluator encodes captions in chunks of different widths and scores in tiles."""
    model = small(name, **({} if name in VSEPP_NAMES else {"pair_block": 7})).eval()
    feats, (tokens, lengths) = fake_features(6), fake_text(11)
    full = scores(model, feats, tokens, lengths)
    for constant in ("ENCODE_CHUNK", "SCORE_IMAGE_BLOCK", "SCORE_CAPTION_BLOCK"):
        monkeypatch.setattr(evaluation, constant, 4)  # chunks of 4: 6 images and 11 captions split unevenly
    blocked = compute_similarity(model, feats, tokens, lengths, progress=False)
    assert torch.allclose(blocked, full, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padding_does_not_change_scores(name):
    model = small(name).eval()
    feats, (tokens, lengths) = fake_features(3), fake_text(4)
    base = scores(model, feats, tokens, lengths)
    changed = {k: v.clone() for k, v in feats.items()}
    changed["regions"][0, 3:] = 100.0  # boxes 3.. of image 0 are masked out
    changed["level1"] += 1.0  # no model here reads level1
    wider = torch.cat([tokens, torch.zeros(4, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(scores(model, changed, wider, lengths), base, atol=1e-5)


@pytest.mark.parametrize("name", ["scan-t2i", "scan-i2t"])
def test_scan_scores_do_depend_on_real_regions_and_words(name):
    """Guards the padding test above against a model that ignores its inputs."""
    model = small(name).eval()
    feats, (tokens, lengths) = fake_features(3), fake_text(4)
    base = scores(model, feats, tokens, lengths)
    changed = {k: v.clone() for k, v in feats.items()}
    changed["regions"][1, 0] = torch.randn(32)
    assert not torch.allclose(scores(model, changed, tokens, lengths)[1], base[1], atol=1e-4)
    other = tokens.clone()
    other[1, 0] = (other[1, 0] % (VOCAB - 1)) + 1
    assert not torch.allclose(scores(model, feats, other, lengths)[:, 1], base[:, 1], atol=1e-4)


# --- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
    spec = get_model_spec(name)
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec
    a = create_model(spec, FEATURE_DIMS, VOCAB, embed_dim=EMBED, word_dim=16)
    b = create_model(again, FEATURE_DIMS, VOCAB, embed_dim=EMBED, word_dim=16)
    assert a.config == b.config and type(a) is type(b)
    shapes_a = {k: v.shape for k, v in a.state_dict().items()}
    assert shapes_a == {k: v.shape for k, v in b.state_dict().items()}
    assert "standardize.level4_mean" in shapes_a if name in VSEPP_NAMES else "standardize.regions_mean" in shapes_a


def test_paper_defaults_in_yaml():
    v = create_model("vsepp", PAPER_DIMS, 100).config
    assert (v.embed_dim, v.word_dim, v.margin, v.hardest_negative) == (1024, 300, 0.2, True)
    assert (v.bidirectional, v.text_pooling) == (False, "last")
    t = create_model("scan-t2i", PAPER_DIMS, 100).config
    assert (t.direction, t.embed_dim, t.word_dim, t.margin, t.hardest_negative) == ("t2i", 1024, 300, 0.2, True)
    assert (t.lambda_softmax, t.aggregation, t.lambda_lse, t.attention_norm) == (9.0, "lse", 6.0, "clipped_l2norm")
    i = create_model("scan-i2t", PAPER_DIMS, 100).config
    assert (i.direction, i.lambda_softmax, i.aggregation, i.lambda_lse, i.attention_norm) == ("i2t", 4.0, "lse", 5.0, "clipped_l2norm")
    assert get_model_spec("scan-i2t").backbone == "resnet50"


@pytest.mark.parametrize(("name", "bad"), [
    ("vsepp", {"text_pooling": "max"}), ("scan-t2i", {"direction": "both"}),
    ("scan-t2i", {"aggregation": "max"}), ("scan-i2t", {"attention_norm": "softmax"}),
])
def test_invalid_options_are_rejected(name, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        small(name, **bad)


def test_vsepp_configs_are_what_they_say():
    """vsepp: VSE++ as its paper (unidirectional GRU, last state, pooled level4, 1024-d);
    vsepp-dove-encoders: bidirectional GRU, mean over words, d = 512, and DOVE Table I's figure."""
    paper = create_model("vsepp", PAPER_DIMS, 100)
    assert (paper.config.bidirectional, paper.config.text_pooling, paper.config.embed_dim) == (False, "last", 1024)
    assert not paper.gru.bidirectional and paper.image_inputs == ("level4",)
    assert "parameters_m" not in get_model_reference("vsepp")  # DOVE Table I's 29 M is not this model
    assert get_model_reference("vsepp")["train"]["batch_size"] == 128
    dove_like = create_model("vsepp-dove-encoders", PAPER_DIMS, 100)
    c = dove_like.config
    assert (c.bidirectional, c.text_pooling, c.embed_dim, c.word_dim, c.margin, c.hardest_negative) == (
        True, "mean", 512, 300, 0.2, True)
    assert dove_like.gru.bidirectional and dove_like.image_inputs == ("level4",)
    assert get_model_spec("vsepp-dove-encoders").backbone == get_model_spec("dove").backbone == "resnet50"
    assert get_model_reference("vsepp-dove-encoders")["parameters_m"] == 29


def test_vsepp_dove_encoders_caption_is_doves_text_without_dtga():
    """With DOVE's weights, the caption embedding is DOVE's T_G with dtga=none (Table III "w/o DTGA"), unit length."""
    vsepp = small("vsepp-dove-encoders").eval()
    torch.manual_seed(1)
    dove = create_model("dove", FEATURE_DIMS, VOCAB, embed_dim=EMBED, word_dim=16, dtga="none").eval()
    own = {k: v for k, v in dove.state_dict().items() if k.startswith(("gru.", "word_embedding."))}
    assert set(own) == {k for k in vsepp.state_dict() if k.startswith(("gru.", "word_embedding."))}
    vsepp.load_state_dict(own, strict=False)
    tokens, lengths = fake_text(5)
    with torch.no_grad():
        got = vsepp.encode_text(tokens, lengths)["embedding"]
        expected = F.normalize(dove.encode_text(tokens, lengths)["global"], dim=-1)
        for k in range(5):  # and written out: mean over true words of the mean of both directions
            out, _ = vsepp.gru(vsepp.word_embedding(tokens[k : k + 1, : int(lengths[k])]))
            forward, backward = out[0].split(EMBED, dim=-1)
            assert torch.allclose(got[k], F.normalize(((forward + backward) / 2).mean(dim=0), dim=-1), atol=1e-5)
    assert torch.allclose(got, expected, atol=1e-5)


def test_parameter_counts_follow_the_layer_sizes():
    """Counts written out from the layer shapes (d = 1024, word_dim 300, vocab 3000)."""
    d, w, vocab = 1024, 300, 3000
    gru_direction = 3 * (d * w + d * d + 2 * d)  # three gates: input and hidden weights, two biases
    vsepp = create_model("vsepp", PAPER_DIMS, vocab)
    assert vsepp.num_parameters() == (2048 * d + d) + vocab * w + gru_direction
    d2 = 512  # vsepp-dove-encoders: d = 512, two GRU directions
    dove_like = create_model("vsepp-dove-encoders", PAPER_DIMS, vocab)
    assert dove_like.num_parameters() == (2048 * d2 + d2) + vocab * w + 2 * 3 * (d2 * w + d2 * d2 + 2 * d2)
    scan = create_model("scan-t2i", PAPER_DIMS, vocab)
    assert scan.num_parameters() == (1024 * d + d) + vocab * w + 2 * gru_direction
    assert scan.num_parameters(trainable_only=True) == scan.num_parameters()  # buffers are not parameters


# --- hand-checked cases ----------------------------------------------------------------------------


def test_vsepp_loss_on_a_hand_made_matrix():
    model = small("vsepp")
    sims = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.3, 0.2], [0.4, 0.6, 0.7]])
    # hinge 0.2 - positive + negative, per anchor (negatives in index order):
    # image rows:     0: (0, 0)        1: (0.7, 0.1)      2: (0, 0.1)
    # caption cols:   0: (0.1, 0)      1: (0.4, 0.5)      2: (0, 0)
    hardest = (0 + 0.7 + 0.1) / 3 + (0.1 + 0.5 + 0) / 3
    assert model.ranking_loss(sims, torch.arange(3)).item() == pytest.approx(hardest, abs=1e-6)
    summed = (0 + 0.8 + 0.1) / 3 + (0.1 + 0.9 + 0) / 3
    assert small("vsepp", hardest_negative=False).ranking_loss(sims, torch.arange(3)).item() == pytest.approx(summed, abs=1e-6)
    # captions 0 and 1 show the same image: (row 1, col 0) and (row 0, col 1) are no longer negatives,
    # leaving rows 0: (0)  1: (0.1)  2: (0, 0.1) and cols 0: (0)  1: (0.5)  2: (0, 0)
    same = (0 + 0.1 + 0.1) / 3 + (0 + 0.5 + 0) / 3
    assert model.ranking_loss(sims, torch.tensor([5, 5, 9])).item() == pytest.approx(same, abs=1e-6)


def test_vsepp_training_loss_is_the_ranking_loss_of_its_scores():
    model = small("vsepp")
    feats, (tokens, lengths) = fake_features(4), fake_text(4)
    ids = torch.tensor([0, 1, 1, 2])
    with torch.no_grad():
        expected = model.ranking_loss(scores(model, feats, tokens, lengths), ids)
        assert torch.allclose(model.training_loss(feats, tokens, lengths, ids)["loss"], expected)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_vsepp_caption_is_the_gru_state_after_the_last_true_word(bidirectional):
    model = small("vsepp", bidirectional=bidirectional).eval()
    tokens, lengths = fake_text(5)
    with torch.no_grad():
        got = model.encode_text(tokens, lengths)["embedding"]
        for k in range(5):
            _, h_n = model.gru(model.word_embedding(tokens[k : k + 1, : int(lengths[k])]))
            expected = F.normalize(h_n.mean(dim=0)[0], dim=-1)  # unidirectional: h_n has one row
            assert torch.allclose(got[k], expected, atol=1e-5), k


def test_vsepp_mean_pooling_averages_the_words():
    model = small("vsepp", text_pooling="mean").eval()
    tokens, lengths = fake_text(4)
    with torch.no_grad():
        got = model.encode_text(tokens, lengths)["embedding"]
        for k in range(4):
            out, _ = model.gru(model.word_embedding(tokens[k : k + 1, : int(lengths[k])]))
            assert torch.allclose(got[k], F.normalize(out[0].mean(dim=0), dim=-1), atol=1e-5), k


def direct_scan_score(regions, region_mask, words, length, config):
    """SCAN's score of one pair written out literally: build a_q, then cos, then pool."""
    v, e = regions[region_mask], words[:length]
    queries, contexts = (e, v) if config.direction == "t2i" else (v, e)
    s = F.cosine_similarity(queries[:, None, :], contexts[None, :, :], dim=-1)  # (Q, C)
    if config.attention_norm == "none":
        s_bar = s
    else:
        t = F.leaky_relu(s, 0.1) if config.attention_norm == "clipped_l2norm" else s.clamp(min=0)
        s_bar = t / (t.norm(dim=0, keepdim=True) + 1e-8)  # normalised over the query fragments
    alpha = torch.softmax(config.lambda_softmax * s_bar, dim=1)  # over the context fragments
    attended = alpha @ contexts
    relevance = F.cosine_similarity(queries, attended, dim=-1)
    if config.aggregation == "mean":
        return relevance.mean()
    return torch.log(torch.exp(config.lambda_lse * relevance).sum()) / config.lambda_lse


@pytest.mark.parametrize(("name", "overrides"), [
    ("scan-t2i", {}), ("scan-i2t", {}),
    ("scan-t2i", {"aggregation": "mean", "attention_norm": "relu_l2norm"}),
    ("scan-i2t", {"attention_norm": "none", "lambda_softmax": 2.0}),
])
def test_scan_matches_the_literal_formula(name, overrides):
    model = small(name, **overrides).eval()
    feats, (tokens, lengths) = fake_features(4), fake_text(5)
    with torch.no_grad():
        images, texts = model.encode_image(feats), model.encode_text(tokens, lengths)
        got = model.similarity(images, texts)
        for i in range(4):
            for j in range(5):
                regions, region_mask = images["regions"][i], images["region_mask"][i]
                want = direct_scan_score(regions, region_mask, texts["words"][j], int(lengths[j]), model.config)
                assert torch.allclose(got[i, j], want, atol=1e-5), (i, j)


def test_scan_t2i_with_one_region_is_lse_of_word_region_cosines():
    """With a single region every word attends to it fully, so S = 1/λ2 · log Σ_j exp(λ2 cos(e_j, v))."""
    model = small("scan-t2i").eval()
    g = torch.Generator().manual_seed(4)
    region = F.normalize(torch.randn(1, 2, EMBED, generator=g), dim=-1)
    images = {"regions": region * torch.tensor([1.0, 0.0])[None, :, None], "region_mask": torch.tensor([[True, False]])}
    words = F.normalize(torch.randn(2, 6, EMBED, generator=g), dim=-1)
    words[1, 3:] = 0.0
    texts = {"words": words, "lengths": torch.tensor([6, 3])}
    got = model.similarity(images, texts)[0]
    for j, length in enumerate((6, 3)):
        cos = words[j, :length] @ region[0, 0]
        assert got[j].item() == pytest.approx((torch.logsumexp(6.0 * cos, dim=0) / 6.0).item(), abs=1e-5)


def test_scan_i2t_one_word_caption_scores_the_mean_cosine_with_mean_pooling():
    """One word is every region's whole context: S_AVG = mean over real regions of cos(v_i, e)."""
    model = small("scan-i2t", aggregation="mean").eval()
    g = torch.Generator().manual_seed(5)
    regions = F.normalize(torch.randn(1, 4, EMBED, generator=g), dim=-1)
    mask = torch.tensor([[True, True, True, False]])
    images = {"regions": regions * mask[..., None], "region_mask": mask}
    word = F.normalize(torch.randn(1, 1, EMBED, generator=g), dim=-1)
    got = model.similarity(images, {"words": word, "lengths": torch.tensor([1])})
    assert got.item() == pytest.approx((regions[0, :3] @ word[0, 0]).mean().item(), abs=1e-5)


@pytest.mark.parametrize("overrides", [
    {}, {"direction": "i2t"}, {"attention_norm": "relu_l2norm"}, {"attention_norm": "none", "aggregation": "mean"},
    {"direction": "i2t", "attention_norm": "relu_l2norm", "aggregation": "mean"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "t2i-default")
def test_scan_gradients_stay_finite_with_an_image_without_boxes(overrides):
    """Zero columns in the L2 norm and all-masked softmax rows must not produce NaN."""
    model = small("scan-t2i", **overrides)
    feats, (tokens, lengths) = fake_features(4), fake_text(4)
    feats["region_mask"][3] = False
    feats["regions"][3] = 0.0
    sims = model.similarity(model.encode_image(feats), model.encode_text(tokens, lengths))
    assert torch.isfinite(sims).all()
    if model.config.direction == "i2t":
        assert torch.equal(sims[3], torch.zeros(4))  # no region to pool over
    loss = model.ranking_loss(sims, torch.arange(4))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
