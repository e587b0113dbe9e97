"""Pyramid ViG backbones: registry, stage shapes, parameter counts, k-NN graph, determinism, weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from helpers import randomise_batchnorm_statistics, same_levels
from rsitr.backbones import backbone_info, create_backbone, list_backbones, load_backbone_weights
from rsitr.backbones.vig import (
    knn_graph,
    max_relative,
    neighbour_schedule,
    rename_reference_keys,
    sincos_relative_position,
)

#: Parameter counts reported by the ViG paper (Table 3, Pyramid ViG, 1000-class head).
PAPER_PARAMS = {"pvig_ti": 10.7e6, "pvig_s": 27.3e6}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return create_backbone("pvig_ti", seed=0).eval()


def test_registered_with_static_info() -> None:
    assert {"pvig_ti", "pvig_s"} <= set(list_backbones())
    info = backbone_info("pvig_s")
    assert info.level_names == ("stage1", "stage2", "stage3", "stage4")
    assert info.level_channels == (80, 160, 400, 640)
    assert info.level_strides == (4, 8, 16, 32) and info.input_size == 224
    assert backbone_info("pvig_ti").level_channels == (48, 96, 240, 384)


def test_stage_shapes_at_224(tiny: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        levels = tiny.forward_levels(x)
        logits = tiny(x)
        pooled = tiny.forward_head(tiny.forward_features(x), pre_logits=True)
    assert [tuple(t.shape) for t in levels] == [(1, 48, 56, 56), (1, 96, 28, 28), (1, 240, 14, 14), (1, 384, 7, 7)]
    assert tuple(logits.shape) == (1, 1000)
    assert tuple(pooled.shape) == (1, tiny.num_features) == (1, 384)
    assert torch.allclose(pooled, levels[-1].mean(dim=(2, 3)), atol=1e-5)


def test_other_input_sizes_follow_the_strides(tiny: torch.nn.Module) -> None:
    with torch.inference_mode():
        levels = tiny.forward_levels(torch.randn(2, 3, 64, 96))
    for level, c, s in zip(levels, tiny.level_channels, tiny.level_strides):
        assert tuple(level.shape) == (2, c, 64 // s, 96 // s)
        assert torch.isfinite(level).all()


@pytest.mark.parametrize("name", ["pvig_ti", "pvig_s"])
def test_parameter_counts_match_the_paper(name: str) -> None:
    model = create_backbone(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(PAPER_PARAMS[name], rel=0.01)
    assert count == {"pvig_ti": 10_714_376, "pvig_s": 27_251_912}[name]
    # the relative-position prior is a fixed buffer, not a parameter
    assert not any("relative_pos" in n for n, _ in model.named_parameters())


def test_reference_layout_and_head_prefix(tiny: torch.nn.Module) -> None:
    keys = set(tiny.state_dict())
    for key in ("pos_embed", "stem.convs.0.weight", "stem.convs.7.running_var", "blocks.0.0.fc1.0.weight",
                "blocks.0.0.graph_conv.gconv.nn.0.weight", "blocks.0.0.relative_pos", "blocks.0.1.fc2.1.weight",
                "blocks.2.conv.0.weight", "blocks.14.1.fc1.0.weight", "prediction.0.weight", "prediction.4.bias"):
        assert key in keys, key
    assert tiny.head_prefixes == ("prediction.",)
    assert tuple(tiny.state_dict()["blocks.0.0.relative_pos"].shape) == (1, 3136, 196)  # r = 4 in stage 1
    assert tuple(tiny.state_dict()["blocks.3.0.relative_pos"].shape) == (1, 784, 196)  # r = 2 in stage 2
    assert tiny.blocks[0][0].graph_conv.gconv.nn[0].groups == 4


def test_neighbour_schedule_grows_k_and_dilation() -> None:
    schedule = neighbour_schedule((2, 2, 6, 2), 9)
    assert schedule[0] == (9, 1) and schedule[-1] == (18, 2)
    assert [d for _, d in schedule] == [1, 1, 1, 1] + [2] * 8
    assert all(k * d <= 49 for k, d in schedule)  # the 7 x 7 last stage holds every candidate


def _unit(angles_deg: list[float]) -> torch.Tensor:
    a = torch.tensor(angles_deg) * math.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], dim=-1)[None]  # (1, N, 2)


def test_knn_picks_true_nearest_neighbours() -> None:
    # Nodes on the unit circle: the distance of normalised features grows with the angle between them.
    nodes = _unit([0, 10, 25, 90, 100, 180])
    got = knn_graph(nodes, nodes, k=3)
    expected = [[0, 1, 2], [1, 0, 2], [2, 1, 0], [3, 4, 2], [4, 3, 2], [5, 4, 3]]
    assert got[0].tolist() == expected
    # Dilation 2: the 2·2 nearest ranked, every second kept (ranks 0 and 2).
    assert knn_graph(nodes, nodes, k=2, dilation=2)[0].tolist() == [[r[0], r[2]] for r in expected]
    # Feature scale does not matter (features are l2-normalised first).
    assert torch.equal(knn_graph(nodes * torch.tensor([[[1.0], [5.0], [0.1], [2.0], [3.0], [9.0]]]), nodes, k=3), got)


def test_knn_with_separate_keys_and_prior() -> None:
    queries = _unit([0, 170])
    keys = _unit([20, 40, 160, 210])
    assert knn_graph(queries, keys, k=2)[0].tolist() == [[0, 1], [2, 3]]
    # A prior is a similarity bonus: it can override feature distance.
    prior = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    assert knn_graph(queries, keys, k=2, prior=prior)[0].tolist() == [[3, 0], [2, 3]]
    # More neighbours asked than keys exist: all keys, nearest first.
    assert knn_graph(queries, keys, k=9)[0, 0].tolist() == [0, 1, 3, 2]


def test_knn_ignores_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    nodes = torch.randn(2, 196, 48, generator=g)
    prior = sincos_relative_position(48, (14, 14))
    reference = knn_graph(nodes, nodes, 9, 2, prior)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(knn_graph(nodes, nodes, 9, 2, prior), reference)


def test_max_relative_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    queries, keys = torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    neighbours = torch.randint(0, 4, (2, 5, 3), generator=g)
    got = max_relative(queries, keys, neighbours)
    for b in range(2):
        for i in range(5):
            brute = torch.stack([keys[b, j] - queries[b, i] for j in neighbours[b, i]]).amax(dim=0)
            assert torch.allclose(got[b, i], brute)


def test_relative_position_prior() -> None:
    prior = sincos_relative_position(48, (4, 4))
    assert tuple(prior.shape) == (16, 16)
    assert torch.allclose(prior.diagonal(), torch.ones(16))
    assert torch.allclose(prior, prior.T)
    assert prior[0, 1] > prior[0, 2] > prior[0, 3]  # decays along a row of the grid
    assert prior[5, 6] == pytest.approx(prior[0, 1].item())  # depends on the offset only
    pooled = sincos_relative_position(48, (4, 4), reduction=2)
    assert tuple(pooled.shape) == (16, 4)
    # query (0, 0) is nearest to the key cell centred at (0.5, 0.5) and equally far from (0.5, 2.5) and (2.5, 0.5)
    assert pooled[0].argmax() == 0 and pooled[0, 1] == pytest.approx(pooled[0, 2].item())


def test_seeded_and_deterministic(tiny: torch.nn.Module) -> None:
    state = torch.get_rng_state()
    again = create_backbone("pvig_ti", seed=0).eval()
    assert torch.equal(torch.get_rng_state(), state), "init must not disturb the global RNG"
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(create_backbone("pvig_ti", seed=1).stem.convs[0].weight, tiny.stem.convs[0].weight)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        first, second = tiny.forward_levels(x), again.forward_levels(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_images_of_a_batch_do_not_interact() -> None:
    """Eval-mode features of an image do not depend on the rest of its batch.

    Checked in float64: in float32 the convolutions of a batch of 1 and of 3 differ by ~1e-6,
    enough to swap two near-equal neighbour ranks in a dilated k-NN list and change deep features.
    """
    model = create_backbone("pvig_ti", seed=0).eval().double()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.inference_mode():
        batch, alone = model.forward_levels(x), model.forward_levels(x[1:2])
    assert all(torch.allclose(a[1:2], b, atol=1e-9, rtol=1e-9) for a, b in zip(batch, alone))


def test_random_init_keeps_features_in_float16_range(tiny: torch.nn.Module) -> None:
    with torch.inference_mode():
        levels = tiny.forward_levels(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4)))
    assert all(level.abs().max() < 1e4 for level in levels)


def _randomised(seed: int) -> torch.nn.Module:
    """A pvig_ti whose BatchNorm statistics and position embedding are non-trivial too."""
    model = create_backbone("pvig_ti", seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=g) * 0.1)
    return randomise_batchnorm_statistics(model, g)


def test_safetensors_round_trip_ignores_the_head(tmp_path) -> None:
    source = _randomised(7)
    state = {k: v.contiguous() for k, v in source.state_dict().items() if not k.startswith("prediction.4.")}
    state["prediction.4.weight"] = torch.zeros(30, 1024, 1, 1)  # a 30-class fine-tuning head
    state["prediction.4.bias"] = torch.zeros(30)
    path = tmp_path / "pvig_ti.safetensors"
    save_file(state, str(path))
    loaded = create_backbone("pvig_ti", weights=path, seed=0)
    assert same_levels(source, loaded)
    assert not same_levels(source, create_backbone("pvig_ti", seed=0))
    target = create_backbone("pvig_ti", seed=1)
    load_backbone_weights(target, path)
    assert torch.equal(target.blocks[0][0].relative_pos, source.blocks[0][0].relative_pos)
    assert same_levels(source, target)  # every loaded tensor, not only the derived position buffer


def test_reference_checkpoint_keys_convert(tmp_path) -> None:
    source = _randomised(5)
    reference = {(f"backbone.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v.contiguous()
                 for k, v in source.state_dict().items()}
    converted = rename_reference_keys(reference)
    assert set(converted) == set(source.state_dict())
    path = tmp_path / "converted.pth"
    torch.save({"state_dict": converted}, path)
    assert same_levels(source, create_backbone("pvig_ti", weights=path, seed=2))


def test_bfloat16_channels_last_runs(tiny: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        levels = tiny.to(memory_format=torch.channels_last).forward_levels(x)
    tiny.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        reference = tiny.forward_levels(x.contiguous())
    assert [t.shape for t in levels] == [t.shape for t in reference]
    # the stem is a plain CNN: bf16 stays close there (deeper stages may pick other neighbours)
    assert F.cosine_similarity(levels[0].float().flatten(), reference[0].flatten(), dim=0) > 0.99
