"""Every shipped model through the same checks and the real pipeline.

Per-model files test each architecture's equations; this file holds every registered model to the
contract the trainer and evaluation rely on: finite loss and gradients on the features its config
asks for, scores that do not depend on how evaluation chunks images and captions, a config that
round-trips, and one epoch through ``rsitr train`` → checkpoint → ``load_run`` → evaluation.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rsitr import evaluation
from rsitr.evaluation import compute_similarity
from rsitr.features import FeatureSpec, feature_dims
from rsitr.models import create_model, get_model_spec, list_models
from rsitr.models.registry import ModelSpec, build_config

VOCAB = 40
MODELS = list_models()
#: Every shipped model, plus settings that change how a pair is scored but not what the configs ship.
SCORING_CASES = [pytest.param(name, {}, id=name) for name in MODELS] + [
    pytest.param("dove", {"test_score": "final+global"}, id="dove,test_score=final+global"),
    pytest.param("dove-s", {"iga": False, "test_score": "final+global"}, id="dove-s,iga=False,test_score=final+global"),
]


def _small_overrides(spec: ModelSpec) -> dict:
    fields = {f.name for f in dataclasses.fields(type(build_config(spec.architecture, spec.params)))}
    return {k: v for k, v in {"embed_dim": 32, "word_dim": 16}.items() if k in fields}


def _dims(spec: ModelSpec) -> dict:
    dims = feature_dims(FeatureSpec(backbone=spec.backbone, **spec.features))
    dims["num_regions"] = 5
    return dims


def _features(model, dims: dict, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, c in enumerate(dims["level_channels"], start=1):
        out[f"level{i}"] = torch.randn(n, c, generator=g)
    out["regions"] = torch.randn(n, 5, dims["region_channels"], generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 3:] = False
    out["regions"][0, 3:] = 0.0
    out["region_mask"] = mask
    for level, (c, size) in dims["maps"].items():
        out[f"map_{level}"] = torch.randn(n, c, size, size, generator=g)
    missing = [k for k in model.image_inputs if k not in out]
    assert not missing, f"model reads features the cache cannot hold: {missing}"
    return {k: out[k] for k in (*model.image_inputs, "region_mask")}


def _text(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 11, (n,), generator=g)
    tokens = torch.randint(1, VOCAB, (n, int(lengths.max())), generator=g)
    tokens[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    keyword_lengths = torch.randint(1, 4, (n,), generator=g)
    keywords = torch.randint(1, VOCAB, (n, 3), generator=g)
    keywords[torch.arange(3)[None, :] >= keyword_lengths[:, None]] = 0
    return tokens, lengths, {"keyword_tokens": keywords, "keyword_lengths": keyword_lengths}


def _build(name: str, **overrides):
    spec = get_model_spec(name)
    dims = _dims(spec)
    torch.manual_seed(0)
    return create_model(spec, dims, VOCAB, **{**_small_overrides(spec), **overrides}), dims


def _chunked_similarity(monkeypatch, chunk: int, *args, **kwargs) -> torch.Tensor:
    """``compute_similarity`` with encoding chunks and scoring blocks of ``chunk`` items each."""
    with monkeypatch.context() as patch:
        for constant in ("ENCODE_CHUNK", "SCORE_IMAGE_BLOCK", "SCORE_CAPTION_BLOCK"):
            patch.setattr(evaluation, constant, chunk)
        return compute_similarity(*args, **kwargs)


def _extras(model, extras: dict) -> dict:
    return extras if "keywords" in model.text_inputs else {}


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_gradients_are_finite(name: str) -> None:
    model, dims = _build(name)
    tokens, lengths, extras = _text(6)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])
    terms = model.training_loss(_features(model, dims, 6), tokens, lengths, image_ids,
                                caption_ids=torch.arange(6), **_extras(model, extras))
    assert terms["loss"].ndim == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert model.word_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "overrides"), SCORING_CASES)
def test_scores_do_not_depend_on_evaluation_chunks(name: str, overrides: dict, monkeypatch) -> None:
    """The full matrix is the same whether images and captions are encoded and scored 2 or 9 at a time."""
    model, dims = _build(name, **overrides)
    model.eval()
    features = _features(model, dims, 7, seed=1)
    tokens, lengths, extras = _text(9, seed=2)
    kwargs = {"text_extras": _extras(model, extras), "progress": False}
    small = _chunked_similarity(monkeypatch, 2, model, features, tokens, lengths, **kwargs)
    large = _chunked_similarity(monkeypatch, 9, model, features, tokens, lengths, **kwargs)
    assert small.shape == (7, 9)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # one pair alone scores what it scores inside the matrix
        alone = model.similarity(
            model.encode_image({k: v[4:5] for k, v in features.items()}),
            model.encode_text(tokens[6:7, : int(lengths[6])], lengths[6:7],
                              **{k: v[6:7] for k, v in _extras(model, extras).items()}),
        )
    torch.testing.assert_close(alone[0, 0], large[4, 6], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_config_round_trip_and_seeded_init(name: str) -> None:
    spec = get_model_spec(name)
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec
    assert build_config(again.architecture, again.params) == build_config(spec.architecture, spec.params)
    first, _ = _build(name)
    second, _ = _build(name)
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), key


# One model per architecture through the real trainer, at small sizes: features of the model's
# own backbone and maps, one epoch, best checkpoint, reload, evaluation.
PIPELINE = {
    "vsepp": [], "scan-t2i": [], "amfmn-sim": [],
    "dsan-t2i": ["model.features.image_size=80"],
    "acf": ["model.features.image_size=64"],
}


@pytest.mark.parametrize("name", sorted(PIPELINE))
def test_one_epoch_through_the_pipeline(name: str, tiny_synth, tmp_path) -> None:
    from rsitr_train.config import load_config
    from rsitr_train.runs import load_run
    from rsitr_train.trainer import evaluate_split, train

    spec = get_model_spec(name)
    overrides = [f"data.path={tiny_synth}", f"model.name={name}", "features.image_size=64", "features.precision=fp32",
                 f"features.cache_dir={tmp_path / 'cache'}", "train.epochs=1", "train.batch_size=20",
                 *(f"model.params.{k}={v}" for k, v in _small_overrides(spec).items()), *PIPELINE[name]]
    summary = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert summary["best_epoch"] == 1
    model, prepared = load_run(tmp_path / "run", progress=False)
    metrics, sims, data = evaluate_split(model, prepared, "test", progress=False)
    assert sims.shape == (len(data.image_ids), len(data.lengths))
    assert torch.isfinite(sims).all() and 0.0 <= metrics["mR"] <= 100.0


@pytest.mark.parametrize("name", ["scan-t2i", "dsan-t2i", "acf"])
def test_word_level_models_score_captions_longer_than_48_tokens(name: str, monkeypatch) -> None:
    """Word encodings of chunks have their own widths (up to 60 here) and score the same in any chunking."""
    model, dims = _build(name)
    model.eval()
    features = _features(model, dims, 4, seed=3)
    _, _, extras = _text(9, seed=4)
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([60, 3, 49, 12, 55, 2, 30, 60, 7])
    tokens = torch.randint(1, VOCAB, (9, 64), generator=g)
    tokens[torch.arange(64)[None, :] >= lengths[:, None]] = 0
    kwargs = {"text_extras": _extras(model, extras), "progress": False}
    small = _chunked_similarity(monkeypatch, 2, model, features, tokens, lengths, **kwargs)
    large = _chunked_similarity(monkeypatch, 9, model, features, tokens, lengths, **kwargs)
    assert small.shape == (4, 9) and torch.isfinite(small).all()
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        words = model.encode_text(tokens[2:4], lengths[2:4])["words"]
    assert words.shape[1] == 49  # the chunk's longest caption, not a fixed width


@pytest.mark.parametrize("name", MODELS)
def test_bf16_evaluation_runs_and_gives_float32_scores_close_to_fp32(name: str) -> None:
    """`--precision bf16` must work for every model, and its scores must not be rounded to bf16 (ties)."""
    model, dims = _build(name)
    model.eval()
    features = _features(model, dims, 6, seed=3)
    tokens, lengths, extras = _text(8, seed=4)
    kwargs = {"text_extras": _extras(model, extras), "progress": False}
    fp32 = compute_similarity(model, features, tokens, lengths, precision="fp32", **kwargs)
    bf16 = compute_similarity(model, features, tokens, lengths, precision="bf16", **kwargs)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, bf16.to(torch.bfloat16).float())  # not on bf16's 8-bit grid
    assert (bf16 - fp32).abs().max() < 0.1
