"""The frozen feature path's speed measures change no value beyond rounding.

BatchNorm folding (against the modules it replaces, and that it always reads the current weights),
RoIAlign as a weight-matrix product (against a naive loop and the bin mean), and pooling in
float32 slices of the batch (against one pass over the whole batch).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

import rsitr.features.compute as compute
from rsitr.backbones import Backbone, create_backbone, fold
from rsitr.backbones.fold import foldable_pairs, folded_forward_levels
from rsitr.features import FeatureSpec, backbone_features, load_backbone
from rsitr.features.roi import default_boxes, roi_align, roi_mean
from rsitr.precision import autocast
from test_roi import _naive_roi_align

SPEC = FeatureSpec(backbone="resnet18", image_size=64, precision="fp32")


def _trained_looking(model: Backbone, seed: int = 0) -> Backbone:
    """``model`` with BatchNorm statistics and affine parameters far from their init (identity-like) values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.2)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.3)
    return model.eval()


def _images(n: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _levels(model: Backbone, images: torch.Tensor, precision: str = "fp32", folded: bool = False,
            weight_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast(precision):
        levels = folded_forward_levels(model, images, weight_dtype) if folded else model.forward_levels(images)
    return [lvl.float() for lvl in levels]


def _close(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))


def test_folded_resnet_computes_the_same_function_without_its_batchnorms() -> None:
    model = _trained_looking(load_backbone(SPEC))
    assert len(foldable_pairs(model)) == 20  # stem, 2 x 8 block convolutions, 3 projection shortcuts
    _close(_levels(model, _images(), folded=True), _levels(model, _images()))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20  # the backbone itself is untouched
    assert set(model.state_dict()) == set(create_backbone("resnet18").state_dict())


def test_folded_inception_computes_the_same_function() -> None:
    model = _trained_looking(create_backbone("inception_v3").eval())
    assert foldable_pairs(model)
    _close(_levels(model, _images(1, 96), folded=True), _levels(model, _images(1, 96)))


def test_folding_under_bf16_differs_by_bf16_rounding_only() -> None:
    """Folded bf16 maps are as close to the fp32 maps as the unfolded bf16 maps are (within 2x)."""
    model = _trained_looking(load_backbone(SPEC))
    images = _images(4)
    exact = _levels(model, images, "fp32")
    plain = _levels(model, images, "bf16")
    fused = _levels(model, images, "bf16", folded=True, weight_dtype=torch.bfloat16)
    for reference, p, f in zip(exact, plain, fused, strict=True):
        plain_error = float((p - reference).abs().max())
        assert 0 < float((f - reference).abs().max()) <= 2 * plain_error
        assert float((f - p).abs().max()) <= 2 * plain_error


def test_weights_made_in_the_autocast_dtype_round_as_autocast_does() -> None:
    model = _trained_looking(load_backbone(SPEC))
    cast_by_autocast = _levels(model, _images(), "bf16", folded=True)
    made_in_bf16 = _levels(model, _images(), "bf16", folded=True, weight_dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(cast_by_autocast, made_in_bf16, strict=True))


def test_every_call_folds_the_current_weights_and_statistics() -> None:
    """Nothing but the weightless skeleton is kept, so changes no version counter sees still count."""
    model = _trained_looking(load_backbone(SPEC))
    before = _levels(model, _images(), folded=True)
    model.layer1[0].conv1.weight.data.mul_(2.0)  # through .data, as no version counter sees (nor fused Adam's steps)
    with torch.no_grad():
        model.train()(_images(4))  # BatchNorm running statistics rewritten inside the kernel
    model.eval()
    after = _levels(model, _images(), folded=True)
    assert not torch.equal(after[3], before[3])
    _close(after, _levels(model, _images()))
    model.load_state_dict(_trained_looking(load_backbone(SPEC), seed=5).state_dict())
    _close(_levels(model, _images(), folded=True), _levels(model, _images()))


def test_the_skeleton_holds_no_weights() -> None:
    model = _trained_looking(load_backbone(SPEC))
    _levels(model, _images(), folded=True)
    skeleton = fold._SKELETONS[model][2]
    assert all(t.device.type == "meta" for t in (*skeleton.parameters(), *skeleton.buffers()))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in skeleton.modules())


def test_a_backbone_without_pairs_runs_as_it_is() -> None:
    class Plain(Backbone):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward_levels(self, x: torch.Tensor) -> list[torch.Tensor]:
            return [self.bn(self.conv(x))]

    plain = Plain().eval()
    assert foldable_pairs(plain) == []  # it names none, so nothing is folded
    assert torch.equal(_levels(plain, _images(), folded=True)[0], _levels(plain, _images())[0])


def test_roi_align_as_a_product_matches_the_naive_loop_and_the_bin_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 7, 9, generator=generator)
    boxes = torch.tensor([[[-20.0, -10.0, 30.0, 40.0], [3.0, 5.0, 70.0, 60.0], [50.0, 40.0, 90.0, 80.0]],
                          [[0.0, 0.0, 72.0, 56.0], [10.0, 10.0, 11.0, 12.0], [60.0, 2.0, 100.0, 70.0]]])
    expected = _naive_roi_align(features, boxes, 1 / 8, 3, 2)
    torch.testing.assert_close(roi_align(features, boxes, 1 / 8, 3, 2).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roi_mean(features, boxes, 1 / 8, 3, 2).double(), expected.mean(dim=(3, 4)),
                               rtol=1e-5, atol=1e-5)


def test_roi_of_a_bf16_channels_last_map_sums_in_float32() -> None:
    features = torch.randn(2, 16, 8, 8).to(torch.bfloat16)
    boxes = default_boxes(64).expand(2, 36, 4)
    wide = roi_mean(features.float(), boxes, 1 / 8)
    narrow = roi_mean(features.contiguous(memory_format=torch.channels_last), boxes, 1 / 8)
    assert narrow.dtype == torch.float32
    torch.testing.assert_close(narrow, wide, rtol=1e-6, atol=1e-6)  # same values in, float32 sums: rounding only


def test_pooling_in_slices_gives_the_whole_batch_values(monkeypatch) -> None:
    model = _trained_looking(load_backbone(SPEC))
    spec = replace(SPEC, maps=("layer4:1",))
    images, boxes = _images(3), default_boxes(64).expand(3, 36, 4)
    mask = torch.ones(3, 36, dtype=torch.bool)
    with torch.inference_mode():
        whole = backbone_features(model, images, boxes, mask, spec)
        monkeypatch.setattr(compute, "_CHUNK_BYTES", 1)  # one image per slice
        sliced = backbone_features(model, images, boxes, mask, spec)
    for key in ("level1", "level2", "level3", "level4", "map_layer4", "regions"):
        torch.testing.assert_close(sliced[key], whole[key], rtol=1e-6, atol=1e-6, msg=key)


def test_frozen_features_agree_with_the_gradient_path_and_are_deterministic() -> None:
    """The frozen (folded) path gives the modules' values up to rounding, and the same values for the same weights."""
    model = _trained_looking(load_backbone(SPEC))
    images, boxes = _images(2), default_boxes(64).expand(2, 36, 4)
    mask = torch.ones(2, 36, dtype=torch.bool)
    with torch.inference_mode():
        frozen = backbone_features(model, images, boxes, mask, SPEC)
        again = backbone_features(_trained_looking(load_backbone(SPEC)), images, boxes, mask, SPEC)  # a fresh fold
    with torch.enable_grad():
        graded = backbone_features(model, images, boxes, mask, SPEC)  # runs the BatchNorm modules
    for key in ("level1", "level4", "regions"):
        assert frozen[key].dtype == torch.float32
        assert torch.equal(frozen[key], again[key]), key
        torch.testing.assert_close(frozen[key], graded[key].detach(), rtol=1e-4, atol=1e-4, msg=key)
