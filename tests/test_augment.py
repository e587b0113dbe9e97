"""Batched augmentation: exact geometry, reproducibility, colour jitter and ranges."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsitr.errors import ConfigError
from rsitr_train.augment import (
    AugmentConfig,
    augment_batch,
    color_jitter,
    eval_transform,
    identity_geometry,
    sample_geometry,
    warp,
)

#: Geometry switched off entirely: full-frame crop, no flips, no rotation, no colour jitter.
STILL = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rotate90=False,
             brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def _image(height: int = 6, width: int = 6) -> torch.Tensor:
    """A (1, 3, H, W) uint8 image whose every pixel differs from its mirror and rotated images."""
    values = torch.arange(3 * height * width, dtype=torch.int64).view(1, 3, height, width)
    return (values * 7 % 251).to(torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_horizontal_flip_alone_gives_the_mirror_image() -> None:
    x = _image()
    config = AugmentConfig(**{**STILL, "hflip": 1.0})
    out = augment_batch(x, config, size=6, generator=_gen())
    expected = x.flip(-1).float() / 255
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, x.float() / 255)  # the test image is not symmetric


def test_vertical_flip_alone_flips_rows() -> None:
    x = _image()
    out = augment_batch(x, AugmentConfig(**{**STILL, "vflip": 1.0}), size=6, generator=_gen())
    torch.testing.assert_close(out, x.flip(-2).float() / 255, atol=1e-6, rtol=0)


@pytest.mark.parametrize("quarter", [0, 1, 2, 3])
def test_warp_quarter_turns_match_rot90(quarter: int) -> None:
    x = _image(8, 8)
    geometry = identity_geometry(1)
    geometry.quarter[:] = quarter
    out = warp(x, geometry, 8)
    torch.testing.assert_close(out, torch.rot90(x, quarter, dims=(-2, -1)).float() / 255, atol=1e-6, rtol=0)


def test_random_rotation_gives_exact_quarter_turns_and_all_of_them() -> None:
    x = _image(8, 8).repeat(16, 1, 1, 1)
    out = augment_batch(x, AugmentConfig(**{**STILL, "rotate90": True}), size=8, generator=_gen(1))
    turns = [torch.rot90(x[:1], k, dims=(-2, -1)).float() / 255 for k in range(4)]
    seen = set()
    for sample in out:
        matches = [k for k, t in enumerate(turns) if torch.allclose(sample, t[0], atol=1e-6)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_identity_crop_reproduces_the_resized_input() -> None:
    x = torch.rand(2, 3, 48, 48, generator=_gen(2))
    out = augment_batch(x, AugmentConfig(**STILL), size=32, generator=_gen())
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_full_frame_of_a_non_square_image_needs_its_aspect_ratio() -> None:
    x = torch.rand(1, 3, 48, 40, generator=_gen(3))
    ratio = 40 / 48  # width / height of the input: the crop is the whole frame
    out = augment_batch(x, AugmentConfig(**{**STILL, "ratio": (ratio, ratio)}), size=24, generator=_gen())
    expected = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_uint8_and_float_inputs_agree() -> None:
    x = _image(20, 20).repeat(4, 1, 1, 1)
    config = AugmentConfig()
    from_uint8 = augment_batch(x, config, 16, _gen(5))
    from_float = augment_batch(x.float() / 255, config, 16, _gen(5))
    torch.testing.assert_close(from_uint8, from_float, atol=1e-6, rtol=0)


def test_same_seed_same_batch_other_seed_other_batch() -> None:
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=_gen(4))
    config = AugmentConfig(hue=0.1)
    first = augment_batch(x, config, 32, _gen(7))
    again = augment_batch(x, config, 32, _gen(7))
    other = augment_batch(x, config, 32, _gen(8))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_crops_stay_inside_the_image() -> None:
    config = AugmentConfig(scale=(0.1, 1.0), ratio=(0.5, 2.0))
    g = sample_geometry(2000, 30, 50, config, _gen(6))
    assert bool((g.cx.abs() + g.width <= 1 + 1e-9).all())
    assert bool((g.cy.abs() + g.height <= 1 + 1e-9).all())
    area = g.width * g.height
    assert float(area.min()) >= 0.1 - 1e-9 and float(area.max()) <= 1.0
    assert 0.4 < float(g.hflip.float().mean()) < 0.6
    assert set(g.quarter.tolist()) == {0, 1, 2, 3}


def test_zero_strength_colour_jitter_is_the_identity() -> None:
    x = torch.rand(3, 3, 10, 10, generator=_gen(9))
    config = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert torch.equal(color_jitter(x, config, _gen()), x)


def test_brightness_scales_each_image_by_one_factor_in_range() -> None:
    x = 0.05 + 0.4 * torch.rand(6, 3, 8, 8, generator=_gen(10))  # low enough never to clip at 1.2x
    config = AugmentConfig(brightness=0.2, contrast=0.0, saturation=0.0, hue=0.0)
    out = color_jitter(x, config, _gen(11))
    ratios = out / x
    per_image = ratios.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image), atol=1e-5, rtol=0)
    factors = per_image[:, 0]
    assert float(factors.min()) >= 0.8 - 1e-6 and float(factors.max()) <= 1.2 + 1e-6
    assert float(factors.std()) > 0.01  # drawn per image


def test_hue_and_saturation_leave_grey_pixels_grey() -> None:
    grey = torch.rand(4, 1, 8, 8, generator=_gen(12)).expand(4, 3, 8, 8).contiguous()
    config = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.5, hue=0.4)
    out = color_jitter(grey, config, _gen(13))
    torch.testing.assert_close(out, grey, atol=1e-5, rtol=0)
    coloured = torch.rand(4, 3, 8, 8, generator=_gen(14))
    assert not torch.allclose(color_jitter(coloured, config, _gen(13)), coloured, atol=1e-3)


def test_outputs_are_float_in_range_at_the_output_size() -> None:
    x = torch.randint(0, 256, (5, 3, 37, 53), dtype=torch.uint8, generator=_gen(15))
    strong = AugmentConfig(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
    out = augment_batch(x, strong, 29, _gen(16))
    assert out.shape == (5, 3, 29, 29) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0  # strong jitter does hit the clamp


def test_eval_transform_resizes_only() -> None:
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=_gen(17))
    assert torch.equal(eval_transform(x, 40), x.float() / 255)
    assert eval_transform(x, 20).shape == (2, 3, 20, 20)
    # A one-pixel checkerboard shrunk 3x (antialiased) becomes an even grey, not a moire pattern.
    rows, cols = torch.meshgrid(torch.arange(60), torch.arange(60), indexing="ij")
    board = (((rows + cols) % 2) * 255).to(torch.uint8).expand(1, 3, 60, 60)
    small = eval_transform(board, 20)
    assert float((small - 0.5).abs().max()) < 0.06


@pytest.mark.parametrize("bad", [dict(scale=(0.0, 1.0)), dict(scale=(0.5, 1.2)), dict(ratio=(2.0, 1.0)),
                                 dict(hflip=1.5), dict(brightness=-0.1), dict(hue=0.7)])
def test_invalid_parameters_are_config_errors(bad: dict) -> None:
    with pytest.raises(ConfigError):
        AugmentConfig(**bad)


def test_config_round_trips_through_a_dict() -> None:
    config = AugmentConfig(scale=(0.5, 0.9), hue=0.05)
    assert AugmentConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown"):
        AugmentConfig.from_dict({"sclae": [0.5, 1.0]})
