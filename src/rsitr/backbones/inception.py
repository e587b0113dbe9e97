"""Inception-v3 (Szegedy et al., "Rethinking the Inception Architecture") in plain PyTorch.

DSAN (Sec. IV-B) describes every image by K = 64 visual features of D = 2048 channels taken from
an ImageNet-pretrained Inception-v3 that is not fine-tuned: the 8 × 8 × 2048 output of the last
Inception block (``Mixed_7c``) at the architecture's native 299 × 299 input.

torchvision is not a dependency, so the network is written out here. Module, parameter and buffer
names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_6b.branch7x7dbl_3.bn.running_var``,
``AuxLogits.conv1.conv.weight``, ``fc.bias`` ...) are exactly torchvision's ``inception_v3``
names, so its ImageNet checkpoint (and timm's, which uses the same names) loads unchanged. The
auxiliary classifier ``AuxLogits`` exists only so that those checkpoints load strictly; feature
extraction never runs it, and weight loading skips it together with ``fc`` (``head_prefixes``).

Levels (:meth:`Inception3.forward_levels`, finest first) and their sizes at 299 px:

=============  ==================  ========  ================
level name     module output       channels  size at 299 px
=============  ==================  ========  ================
``conv2d_4a``  ``Conv2d_4a_3x3``   192       71 × 71
``mixed_5d``   ``Mixed_5d``        288       35 × 35
``mixed_6e``   ``Mixed_6e``        768       17 × 17
``mixed_7c``   ``Mixed_7c``        2048      8 × 8
=============  ==================  ========  ================

Every downsampling step of Inception-v3 is an unpadded ("valid") 3 × 3 convolution or pooling
of stride 2, so a level's side is ``floor``-ed below ``input / stride``; the registered strides
4, 8, 16, 32 are the nominal factors (RoIAlign box scaling with them is off by a few pixels at the
map border). The smallest input side that still leaves a 1 × 1 ``Mixed_7c`` map is 75 px
(:func:`level_sizes` gives the exact sizes for any side).

``transform_input``: the ImageNet checkpoint was trained on pixels scaled to [-1, 1], while this
package feeds every backbone ImageNet mean/std-normalised images. With ``transform_input=True``
(the default, as torchvision sets it for its pretrained weights) the first step undoes the
mean/std normalisation and rescales each channel to [-1, 1]; set it False for weights trained on
mean/std-normalised input.
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rsitr.backbones.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, register_backbone

#: Names of the four levels returned by :meth:`Inception3.forward_levels`, finest first.
LEVEL_NAMES = ("conv2d_4a", "mixed_5d", "mixed_6e", "mixed_7c")
#: Channels of those levels.
LEVEL_CHANNELS = (192, 288, 768, 2048)
#: Nominal downsampling factors of those levels (valid convolutions make the true sides smaller).
LEVEL_STRIDES = (4, 8, 16, 32)
#: The input side Inception-v3 was designed and pretrained for.
INPUT_SIZE = 299
#: Smallest square input side for which every level is at least 1 × 1.
MIN_INPUT_SIZE = 75
#: Batch-norm epsilon of the reference implementation (its checkpoints' statistics assume it).
BN_EPS = 1e-3

_Size = int | tuple[int, int]


class _KernelArgs(TypedDict):
    """``kernel_size`` and ``padding`` of a factorised (1 × n or n × 1) :class:`BasicConv2d`."""

    kernel_size: _Size
    padding: _Size


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: the unit every Inception branch uses."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: _Size, stride: int = 1, padding: _Size = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _pool_3x3_same(x: Tensor) -> Tensor:
    """3 × 3 average pooling of stride 1 that keeps the spatial size (the pooling branch of A, C, E)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


def _pool_3x3_reduce(x: Tensor) -> Tensor:
    """3 × 3 max pooling of stride 2 without padding (the pooling branch of the grid reductions)."""
    return F.max_pool2d(x, kernel_size=3, stride=2)


class InceptionA(nn.Module):
    """35 × 35 block (Mixed_5b–5d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | pool→1×1; 224 + pool_features channels."""

    def __init__(self, in_ch: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch1x1(x)
        wide = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = self.branch_pool(_pool_3x3_same(x))
        return torch.cat([single, wide, double, pooled], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 → 17 (Mixed_6a): strided 3×3 | 1×1→3×3→strided 3×3 | max pool; 480 + in channels."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch3x3(x)
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([single, double, _pool_3x3_reduce(x)], dim=1)


class InceptionC(nn.Module):
    """17 × 17 block (Mixed_6b–6e) with factorised 7×7 convolutions (1×7 and 7×1); 768 channels.

    Branches: 1×1 | 1×1→1×7→7×1 | 1×1→7×1→1×7→7×1→1×7 | pool→1×1, each ending in 192 channels;
    ``channels_7x7`` is the width inside the factorised branches.
    """

    def __init__(self, in_ch: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        row: _KernelArgs = {"kernel_size": (1, 7), "padding": (0, 3)}
        col: _KernelArgs = {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch1x1(x)
        factorised = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = x
        for stage in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            double = stage(double)
        pooled = self.branch_pool(_pool_3x3_same(x))
        return torch.cat([single, factorised, double, pooled], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 → 8 (Mixed_7a): 1×1→strided 3×3 | 1×1→1×7→7×1→strided 3×3 | max pool; 512 + in."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        short = self.branch3x3_2(self.branch3x3_1(x))
        long = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([short, long, _pool_3x3_reduce(x)], dim=1)


class InceptionE(nn.Module):
    """8 × 8 block (Mixed_7b, 7c) whose 3×3 branches fan out into parallel 1×3 and 3×1; 2048 channels.

    Branches: 1×1 (320) | 1×1→{1×3, 3×1} (2 × 384) | 1×1→3×3→{1×3, 3×1} (2 × 384) | pool→1×1 (192).
    """

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        row: _KernelArgs = {"kernel_size": (1, 3), "padding": (0, 1)}
        col: _KernelArgs = {"kernel_size": (3, 1), "padding": (1, 0)}
        self.branch1x1 = BasicConv2d(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(in_ch, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch1x1(x)
        mid = self.branch3x3_1(x)
        split = [self.branch3x3_2a(mid), self.branch3x3_2b(mid)]
        deep = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        split_deep = [self.branch3x3dbl_3a(deep), self.branch3x3dbl_3b(deep)]
        pooled = self.branch_pool(_pool_3x3_same(x))
        return torch.cat([single, *split, *split_deep, pooled], dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on the 17 × 17 grid (training-time regulariser; kept for checkpoint keys only)."""

    def __init__(self, in_ch: int, num_classes: int) -> None:
        super().__init__()
        self.conv0 = BasicConv2d(in_ch, 128, kernel_size=1)
        self.conv1 = BasicConv2d(128, 768, kernel_size=5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(self.conv0(F.avg_pool2d(x, kernel_size=5, stride=3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Inception3(Backbone):
    """Inception-v3 with torchvision's module names; see the module docstring for levels and input.

    Args:
        num_classes: rows of the ``fc`` classifier (1000 for ImageNet checkpoints).
        aux_logits: build ``AuxLogits`` (needed only for checkpoint key parity; never run here).
        transform_input: map ImageNet mean/std-normalised input to the [-1, 1] range the
            ImageNet checkpoint expects (True for that checkpoint).
    """

    head_prefixes = ("fc.", "AuxLogits.")
    _input_scale: Tensor
    _input_shift: Tensor

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = True) -> None:
        super().__init__()
        self.name = "inception_v3"
        self.level_channels = LEVEL_CHANNELS
        self.level_strides = LEVEL_STRIDES
        self.num_features = 2048
        self.transform_input = transform_input
        # x_raw = x * std + mean, then 2 * x_raw - 1; non-persistent so state-dict keys stay torchvision's.
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        self.register_buffer("_input_scale", (2 * std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_input_shift", (2 * mean - 1).view(1, 3, 1, 1), persistent=False)
        self._build_stem()
        self._build_blocks(num_classes, aux_logits)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.5)
        self.fc = nn.Linear(2048, num_classes)
        self._init_weights()

    def _build_stem(self) -> None:
        """Five plain convolutions with two max pools: 3 → 192 channels, 299 → 35 px."""
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)

    def _build_blocks(self, num_classes: int, aux_logits: bool) -> None:
        """Inception blocks 5b–7c, and ``AuxLogits`` between 6e and 7a (the reference key order)."""
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.AuxLogits = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)

    def _init_weights(self) -> None:
        """Random init: Kaiming normal (fan_in, ReLU) convolutions, BN weight 1 and bias 0.

        Fan-in scaling keeps activations of unit order through all 94 convolutions when the
        network runs in eval mode with fresh BN statistics, which is how a randomly initialised
        backbone is used here (features of a frozen network). Pretrained weights replace it all.
        The linear classifiers keep :class:`torch.nn.Linear`'s default init.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def prepare_input(self, x: Tensor) -> Tensor:
        """Rescale mean/std-normalised input to [-1, 1] per channel when ``transform_input`` is set."""
        if not self.transform_input:
            return x
        return x * self._input_scale.to(x.dtype) + self._input_shift.to(x.dtype)

    def stem(self, x: Tensor) -> Tensor:
        """Input to the ``Conv2d_4a_3x3`` output (192 channels, nominal stride 4)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(self.prepare_input(x))))
        return self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(self.maxpool1(x)))

    def stages(self) -> list[list[nn.Module]]:
        """The modules between consecutive levels: level k is stage k applied to level k - 1."""
        return [
            [self.maxpool2, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d],
            [self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e],
            [self.Mixed_7a, self.Mixed_7b, self.Mixed_7c],
        ]

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """The conv/bn of every :class:`BasicConv2d` (its forward is relu(bn(conv(x))))."""
        return [(f"{name}.conv", f"{name}.bn") for name, module in self.named_modules() if isinstance(module, BasicConv2d)]

    def forward_levels(self, x: Tensor) -> list[Tensor]:
        """Outputs of ``Conv2d_4a_3x3``, ``Mixed_5d``, ``Mixed_6e``, ``Mixed_7c`` (finest first)."""
        x = self.stem(x)
        levels = [x]
        for stage in self.stages():
            for module in stage:
                x = module(x)
            levels.append(x)
        return levels

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, dropout (inactive in eval mode), ``fc`` unless ``pre_logits``."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(self.dropout(x))


def level_sizes(side: int) -> tuple[int, int, int, int]:
    """Exact side of each level's map for a ``side`` × ``side`` input (unpadded convs and pools)."""

    def reduce(n: int) -> int:  # 3 × 3 window, stride 2, no padding
        return (n - 3) // 2 + 1

    conv_4a = reduce(side) - 2  # Conv2d_1a (stride 2), then Conv2d_2a (valid 3 × 3)
    conv_4a = reduce(conv_4a) - 2  # maxpool1, then Conv2d_4a (valid 3 × 3)
    mixed_5d = reduce(conv_4a)  # maxpool2
    mixed_6e = reduce(mixed_5d)  # Mixed_6a
    mixed_7c = reduce(mixed_6e)  # Mixed_7a
    return conv_4a, mixed_5d, mixed_6e, mixed_7c


@register_backbone("inception_v3", LEVEL_CHANNELS, LEVEL_STRIDES, LEVEL_NAMES, input_size=INPUT_SIZE)
def inception_v3(num_classes: int = 1000, aux_logits: bool = True, transform_input: bool = True) -> Inception3:
    """Inception-v3 laid out as torchvision's, with the auxiliary classifier (27.16 M parameters)."""
    return Inception3(num_classes=num_classes, aux_logits=aux_logits, transform_input=transform_input)
