"""Inception-v3 backbone: reference key names and parameter counts, level shapes, input transform, weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import randomise_batchnorm_statistics, same_levels
from rsitr.backbones import IMAGENET_MEAN, IMAGENET_STD, backbone_info, create_backbone, list_backbones, load_backbone_weights
from rsitr.backbones.inception import LEVEL_NAMES, MIN_INPUT_SIZE, inception_v3, level_sizes
from rsitr.data.images import normalize
from rsitr.errors import CheckpointError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

#: Convolution units of each block type, in the reference order (each unit is ``<name>.conv`` + ``<name>.bn``).
_UNITS = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", *[f"branch7x7dbl_{i}" for i in range(1, 6)],
          "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", *[f"branch7x7x3_{i}" for i in range(1, 5)]],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
    "Aux": ["conv0", "conv1"],
}
_LAYOUT = [
    *[(name, None) for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")],
    ("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"),
    ("Mixed_6b", "C"), ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"),
    ("AuxLogits", "Aux"), ("Mixed_7a", "D"), ("Mixed_7b", "E"), ("Mixed_7c", "E"),
]


def _unit(prefix: str) -> list[str]:
    return [f"{prefix}.conv.weight", *(f"{prefix}.bn.{s}" for s in BN)]


def reference_keys(aux: bool = True) -> list[str]:
    """The state-dict keys of the reference ``inception_v3``, in its order."""
    keys: list[str] = []
    for module, kind in _LAYOUT:
        if kind == "Aux" and not aux:
            continue
        if kind is None:
            keys += _unit(module)
            continue
        for unit in _UNITS[kind]:
            keys += _unit(f"{module}.{unit}")
        if kind == "Aux":
            keys += ["AuxLogits.fc.weight", "AuxLogits.fc.bias"]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return create_backbone("inception_v3", seed=0).eval()


def _randomised(seed: int) -> torch.nn.Module:
    """An Inception-v3 with non-trivial BN statistics and affine parameters, so a lost tensor would show."""
    model = create_backbone("inception_v3", seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    randomise_batchnorm_statistics(model, g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn.bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _levels(model: torch.nn.Module, side: int = 96) -> list[torch.Tensor]:
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval().forward_levels(x)


def test_registered_with_its_levels() -> None:
    assert "inception_v3" in list_backbones()
    info = backbone_info("inception_v3")
    assert info.level_names == LEVEL_NAMES == ("conv2d_4a", "mixed_5d", "mixed_6e", "mixed_7c")
    assert info.level_channels == (192, 288, 768, 2048)
    assert info.level_strides == (4, 8, 16, 32)
    assert info.input_size == 299


def test_keys_match_reference_names_and_order(net: torch.nn.Module) -> None:
    state = net.state_dict()
    assert list(state) == reference_keys()
    assert len(state) == 580
    assert list(inception_v3(aux_logits=False).state_dict()) == reference_keys(aux=False)
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch3x3_1.conv.weight": (384, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "AuxLogits.conv1.conv.weight": (768, 128, 5, 5),
        "AuxLogits.fc.weight": (1000, 768),
        "fc.weight": (1000, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert net.Mixed_6e.branch1x1.bn.eps == 1e-3
    assert net.head_prefixes == ("fc.", "AuxLogits.")


def test_parameter_count_is_the_reference_27_2_million(net: torch.nn.Module) -> None:
    total = sum(p.numel() for p in net.parameters())
    assert total == 27_161_264
    without_aux = sum(p.numel() for n, p in net.named_parameters() if not n.startswith("AuxLogits."))
    assert without_aux == 23_834_568
    assert sum(p.numel() for p in inception_v3(aux_logits=False).parameters()) == without_aux


def test_forward_levels_at_299(net: torch.nn.Module) -> None:
    with torch.no_grad():
        levels = net.forward_levels(torch.randn(1, 3, 299, 299))
        pooled = net.forward_head(levels[-1], pre_logits=True)
        logits = net.forward_head(levels[-1])
    assert [tuple(t.shape[1:]) for t in levels] == [(192, 71, 71), (288, 35, 35), (768, 17, 17), (2048, 8, 8)]
    assert tuple(levels[-1].shape[2:]) == (8, 8)  # DSAN's K = 64 features of D = 2048
    assert tuple(pooled.shape) == (1, 2048) and tuple(logits.shape) == (1, 1000)
    assert torch.allclose(pooled, levels[-1].mean(dim=(2, 3)), atol=1e-5)
    assert all(torch.isfinite(t).all() for t in levels)


@pytest.mark.parametrize("side", [128, MIN_INPUT_SIZE])
def test_forward_levels_at_small_sizes(net: torch.nn.Module, side: int) -> None:
    levels = _levels(net, side)
    assert [t.shape[-1] for t in levels] == list(level_sizes(side))
    assert [t.shape[1] for t in levels] == [192, 288, 768, 2048]
    assert torch.equal(net.forward_features(torch.zeros(1, 3, side, side)), net.forward_levels(torch.zeros(1, 3, side, side))[-1])


def test_level_sizes_and_minimum_input() -> None:
    assert level_sizes(299) == (71, 35, 17, 8)
    assert level_sizes(128) == (28, 13, 6, 2)
    assert level_sizes(MIN_INPUT_SIZE)[-1] == 1 and level_sizes(MIN_INPUT_SIZE - 1)[-1] == 0
    with pytest.raises(RuntimeError):
        _levels(create_backbone("inception_v3"), MIN_INPUT_SIZE - 1)


def test_random_init_keeps_activations_bounded(net: torch.nn.Module) -> None:
    """A randomly initialised network in eval mode gives unit-order features (usable and fp16-safe)."""
    last = _levels(net, 160)[-1]
    assert 1e-2 < last.std().item() < 10 and last.abs().max().item() < 1e3


def test_transform_input_maps_normalised_pixels_to_unit_range() -> None:
    with_transform = inception_v3()
    pixels = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5), torch.ones(3, 4, 4)])
    out = with_transform.prepare_input(normalize(pixels, IMAGENET_MEAN, IMAGENET_STD))
    assert torch.allclose(out[0], torch.full_like(out[0], -1.0), atol=1e-5)
    assert torch.allclose(out[1], torch.zeros_like(out[1]), atol=1e-5)
    assert torch.allclose(out[2], torch.ones_like(out[2]), atol=1e-5)
    without = inception_v3(transform_input=False)
    x = torch.randn(1, 3, 4, 4)
    assert torch.equal(without.prepare_input(x), x)
    # the transform's constants are not state: keys stay the reference's
    assert not any("input" in k for k in with_transform.state_dict())


def test_safetensors_round_trip_through_load_backbone_weights(tmp_path) -> None:
    source = _randomised(7)
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = create_backbone("inception_v3", seed=1)
    assert not same_levels(source, target, side=96)
    load_backbone_weights(target, path)
    assert same_levels(source, target, side=96)
    assert same_levels(source, create_backbone("inception_v3", weights=path), side=96)


def test_foreign_heads_and_missing_aux_are_skipped(tmp_path) -> None:
    source = _randomised(5)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(("AuxLogits.", "fc."))}
    state["fc.weight"], state["fc.bias"] = torch.zeros(45, 2048), torch.zeros(45)  # a 45-class head
    path = tmp_path / "no_aux.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    target = create_backbone("inception_v3", weights=path)
    assert same_levels(source, target, side=96)


def test_mismatched_weights_raise_checkpoint_error(tmp_path) -> None:
    state = {k: v for k, v in create_backbone("inception_v3").state_dict().items() if not k.startswith("Mixed_7c.")}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: Mixed_7c\.branch1x1\.conv\.weight"):
        create_backbone("inception_v3", weights=path)
    resnet = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in create_backbone("resnet18").state_dict().items()}, str(resnet))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        create_backbone("inception_v3", weights=resnet)
