"""ResNet backbones: torchvision key names, parameter counts, weight loading, level shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import randomise_batchnorm_statistics, same_levels
from rsitr.backbones import create_backbone, list_backbones, load_backbone_weights
from rsitr.errors import CheckpointError, ConfigError

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{s}" for s in BN]


def _expected_keys(blocks: list[int], convs_per_block: int, layer1_downsample: bool) -> list[str]:
    """torchvision's state_dict keys of a ResNet, in torchvision's order."""
    keys = ["conv1.weight", *_bn("bn1")]
    for layer, count in enumerate(blocks, start=1):
        for b in range(count):
            p = f"layer{layer}.{b}"
            for c in range(1, convs_per_block + 1):
                keys += [f"{p}.conv{c}.weight", *_bn(f"{p}.bn{c}")]
            if b == 0 and (layer > 1 or layer1_downsample):
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


RESNET18_KEYS = _expected_keys([2, 2, 2, 2], 2, layer1_downsample=False)
RESNET50_KEYS = _expected_keys([3, 4, 6, 3], 3, layer1_downsample=True)


@pytest.fixture(scope="module")
def r18() -> torch.nn.Module:
    return create_backbone("resnet18", seed=0).eval()


@pytest.fixture(scope="module")
def r50() -> torch.nn.Module:
    return create_backbone("resnet50", seed=0).eval()


def test_registry_and_unknown_name() -> None:
    assert {"resnet18", "resnet50", "inception_v3"} <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())
    with pytest.raises(ConfigError, match="resnet18, resnet50"):
        create_backbone("resnet101")


def test_resnet18_matches_torchvision_keys_and_params(r18: torch.nn.Module) -> None:
    state = r18.state_dict()
    assert list(state) == RESNET18_KEYS
    assert len(state) == 122
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert tuple(state["layer2.0.downsample.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 512)


def test_resnet50_matches_torchvision_keys_and_params(r50: torch.nn.Module) -> None:
    state = r50.state_dict()
    assert list(state) == RESNET50_KEYS
    assert len(state) == 320
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    assert tuple(state["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    # torchvision v1.5: the stride sits on the 3x3 conv of the first Bottleneck of a stage.
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)


def test_init_is_torchvision_style_and_seeded(r18: torch.nn.Module) -> None:
    assert torch.all(r18.bn1.weight == 1) and torch.all(r18.bn1.bias == 0)
    std = r18.layer4[0].conv1.weight.std().item()
    fan_out = 512 * 3 * 3
    assert std == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.05)
    state = torch.get_rng_state()
    again = create_backbone("resnet18", seed=0)
    assert torch.equal(torch.get_rng_state(), state), "init must not disturb the global RNG"
    assert all(torch.equal(a, b) for a, b in zip(r18.state_dict().values(), again.state_dict().values()))
    other = create_backbone("resnet18", seed=1)
    assert not torch.equal(other.conv1.weight, r18.conv1.weight)


def test_forward_levels_shapes_and_strides(r18: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        levels = r18.forward_levels(x)
        feats = r18.forward_features(x)
        pooled = r18.forward_head(feats, pre_logits=True)
        logits = r18(x)
    assert r18.level_channels == (64, 128, 256, 512)
    assert r18.level_strides == (4, 8, 16, 32)
    for lvl, c, s in zip(levels, r18.level_channels, r18.level_strides):
        assert tuple(lvl.shape) == (2, c, 64 // s, 96 // s)
    assert torch.equal(feats, levels[-1])
    assert tuple(pooled.shape) == (2, r18.num_features) == (2, 512)
    assert tuple(logits.shape) == (2, 1000)


def test_resnet50_level_channels(r50: torch.nn.Module) -> None:
    assert r50.level_channels == (256, 512, 1024, 2048) and r50.num_features == 2048
    with torch.no_grad():
        levels = r50.forward_levels(torch.randn(1, 3, 64, 64))
    assert [tuple(t.shape[1:]) for t in levels] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4), (2048, 2, 2)]


def _randomised(seed: int) -> torch.nn.Module:
    """A resnet18 whose BN statistics are non-trivial too, so a lost buffer would show."""
    model = create_backbone("resnet18", seed=seed).eval()
    return randomise_batchnorm_statistics(model, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weight_round_trip(tmp_path, suffix: str) -> None:
    source = _randomised(7)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = create_backbone("resnet18", weights=path, seed=0)
    assert same_levels(source, loaded)
    assert not same_levels(source, create_backbone("resnet18", seed=0))


def test_wrapped_prefixed_and_foreign_head_load(tmp_path) -> None:
    source = _randomised(5)
    state = {f"module.backbone.{k}": v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    state["module.backbone.fc.weight"] = torch.zeros(30, 512)  # AID head: 30 classes
    state["module.backbone.fc.bias"] = torch.zeros(30)
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    target = create_backbone("resnet18", seed=1)
    load_backbone_weights(target, path)
    assert same_levels(source, target)
    path2 = tmp_path / "model.pth"
    torch.save({"model": source.state_dict()}, path2)
    assert same_levels(source, create_backbone("resnet18", weights=path2))


def test_mismatched_weights_raise_checkpoint_error(tmp_path) -> None:
    r50_state = create_backbone("resnet50").state_dict()
    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in r50_state.items()}, str(path))
    with pytest.raises(CheckpointError, match="r50.safetensors") as info:
        create_backbone("resnet18", weights=path)
    message = str(info.value)
    assert "\n" not in message and "unexpected keys" in message and "shape mismatch" in message

    partial = {k: v for k, v in create_backbone("resnet18").state_dict().items() if "layer4.1" not in k}
    path2 = tmp_path / "partial.pth"
    torch.save(partial, path2)
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing keys: layer4\.1\.conv1\.weight"):
        create_backbone("resnet18", weights=path2)


def test_unreadable_weights_raise_checkpoint_error(tmp_path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        create_backbone("resnet18", weights=junk)
    with pytest.raises(CheckpointError, match="not found"):
        create_backbone("resnet18", weights=tmp_path / "missing.safetensors")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        create_backbone("resnet18", weights=bad_st)


class _Marker:
    """Unpickling this writes a file: proof that loading a weights file ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pth_holding_a_pickled_object_is_refused_without_running_it(tmp_path):
    import pickle

    import pytest

    from rsitr.backbones import create_backbone
    from rsitr.errors import CheckpointError

    marker = tmp_path / "ran"
    weights = tmp_path / "weights.pth"
    with weights.open("wb") as handle:
        pickle.dump({"state_dict": _Marker(str(marker))}, handle)
    with pytest.raises(CheckpointError, match="weights.pth: cannot read backbone weights"):
        create_backbone("resnet18", weights)
    assert not marker.exists()
