"""ResNet-18 and ResNet-50 (torchvision parameter layout), written here without torchvision.

Parameter names match torchvision's (``conv1``, ``bn1``, ``layer1..4``, ``fc``, blocks
with ``downsample.0`` / ``downsample.1``), so ImageNet ``.pth`` files in that layout load
directly. Two knobs serve STCN's encoders:

- ``in_channels``: the value encoder feeds RGB plus mask channels to ``conv1``;
- ``conv_bias``: the published value encoder's convolutions carry biases, torchvision's
  (and the key encoder's) do not.

``num_stages`` builds only ``layer1..layer{num_stages}``; STCN stops after layer3, and
``num_classes`` adds the ``avgpool``/``fc`` classification head (``None``: no head).
Strides follow torchvision's "v1.5" ResNet-50: the 3x3 conv of a bottleneck strides.
"""

import math
from typing import List, Optional, Type, Union

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; ResNet-18/34."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, conv_bias: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4; ResNet-50/101/152."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, conv_bias: bool = False):
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=conv_bias)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and up to four residual stages."""

    def __init__(self, block: Block, blocks_per_stage: List[int], in_channels: int = 3,
                 conv_bias: bool = False, num_stages: int = 4,
                 num_classes: Optional[int] = None):
        super().__init__()
        if not 1 <= num_stages <= len(blocks_per_stage):
            raise ValueError(f"num_stages must be in 1..{len(blocks_per_stage)}, got {num_stages}")
        if num_classes is not None and num_stages != 4:
            raise ValueError("a classification head needs all four stages")
        self.conv_bias = conv_bias
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_names = [f"layer{i + 1}" for i in range(num_stages)]
        in_planes = 64
        for i, name in enumerate(self.stage_names):
            planes = 64 * 2 ** i
            stage = self._make_stage(block, in_planes, planes, blocks_per_stage[i],
                                     stride=1 if i == 0 else 2, conv_bias=conv_bias)
            setattr(self, name, stage)
            in_planes = planes * block.expansion
        self.out_channels = in_planes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(in_planes, num_classes)
        else:
            self.fc = None
        self.reset_parameters()

    @staticmethod
    def _make_stage(block: Block, in_planes: int, planes: int, num_blocks: int,
                    stride: int, conv_bias: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes * block.expansion, 1, stride=stride, bias=conv_bias),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(in_planes, planes, stride, downsample, conv_bias)]
        layers += [block(planes * block.expansion, planes, conv_bias=conv_bias)
                   for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """He-normal convs (fan-out, as torchvision and the published STCN), zero conv
        biases, unit/zero BatchNorm."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> maxpool: stride 4, 64 channels."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.fc is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(**kwargs) -> ResNet:
    """ResNet-18; keyword arguments as for ``ResNet``."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50; keyword arguments as for ``ResNet``."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)
