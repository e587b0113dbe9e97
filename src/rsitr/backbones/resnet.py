"""ResNet-18 and ResNet-50 in plain PyTorch, state-dict compatible with torchvision.

DOVE (Sec. III-A) encodes each image with a frozen ResNet-50: the outputs of ``layer1`` ..
``layer4`` give the N_m = 4 multiscale features M_v of Eq. 1, and an RoI encoder on one of the
maps gives the N_r = 36 region features R_v of Eq. 2. torchvision is not a dependency, so the
network is written out here; parameter and buffer names (``conv1.weight``, ``layer1.0.downsample.0
.weight``, ``fc.bias`` ...) match torchvision's exactly so that its checkpoints, timm's ResNet
checkpoints and AID-finetuned checkpoints derived from them load unchanged. The architecture is
torchvision's "v1.5": in a Bottleneck the stride sits on the 3x3 convolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rsitr.backbones.base import Backbone, register_backbone

#: Names of the four stages whose outputs form the multiscale features (DOVE Eq. 1).
LEVEL_NAMES = ("layer1", "layer2", "layer3", "layer4")
#: Downsampling factor of each stage's output relative to the input image.
LEVEL_STRIDES = (4, 8, 16, 32)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision: no fresh buffer per block (about 8% of a CPU forward)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, as in torchvision v1.5), 1x1 expand by 4; ResNet-50."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place, as torchvision; autograd allows it (BatchNorm's backward does not read its output)
        return self.relu(out)


class ResNet(Backbone):
    """torchvision-compatible ResNet: stem, four stages, global pool, ``fc`` classifier."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 name: str = "resnet") -> None:
        super().__init__()
        self.name = name
        self._in_ch = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.level_channels = tuple(w * block.expansion for w in (64, 128, 256, 512))
        self.level_strides = LEVEL_STRIDES
        self.num_features = 512 * block.expansion
        self._init_weights()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], width: int, blocks: int,
                    stride: int) -> nn.Sequential:
        """One stage; its first block projects the shortcut when shape changes (``downsample``)."""
        out_ch = width * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(_conv1x1(self._in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        modules = [block(self._in_ch, width, stride, downsample)]
        self._in_ch = out_ch
        modules += [block(out_ch, width) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        """torchvision's init: Kaiming normal (fan_out, ReLU) convs, BN weight 1 and bias 0.

        ``fc`` keeps :class:`torch.nn.Linear`'s default init, as in torchvision.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: Tensor) -> Tensor:
        """conv1-bn1-relu-maxpool: stride 4."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_levels(self, x: Tensor) -> list[Tensor]:
        """Outputs of ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32): DOVE's M_v before pooling."""
        x = self.stem(x)
        levels = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            levels.append(x)
        return levels

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """The stem's conv1/bn1, every block's conv<k>/bn<k>, and each projection shortcut's downsample.0/.1."""
        pairs = [("conv1", "bn1")]
        for name, module in self.named_modules():
            if isinstance(module, (BasicBlock, Bottleneck)):
                count = 3 if isinstance(module, Bottleneck) else 2
                pairs += [(f"{name}.conv{k}", f"{name}.bn{k}") for k in range(1, count + 1)]
                if module.downsample is not None:
                    pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
        return pairs

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)


@register_backbone("resnet18", (64, 128, 256, 512), LEVEL_STRIDES, LEVEL_NAMES)
def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2], levels of 64/128/256/512 channels."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, name="resnet18")


@register_backbone("resnet50", (256, 512, 1024, 2048), LEVEL_STRIDES, LEVEL_NAMES)
def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (v1.5): Bottleneck x [3, 4, 6, 3], levels of 256/512/1024/2048 channels."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, name="resnet50")
