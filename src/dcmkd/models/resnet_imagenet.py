"""ImageNet ResNets (He et al. 2016): ResNet-18/34 (basic) and ResNet-50 (bottleneck), 224×224.

Stages: ``conv1`` (7×7/2 conv, BN-ReLU and the 3×3/2 max-pool: stride 4), ``conv2_x`` … ``conv5_x``
(strides 4, 8, 16, 32). Projection shortcuts (option B); the bottleneck has its stride on the 3×3
conv (the common "v1.5", same parameter count as v1). ``StageSpec.width`` is a block's *output*
width, so a bottleneck stage of width 1024 has inner width 256 (DCM supplementary Table 5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.models.base import Backbone, ClassifierHead, StageSpec, init_weights
from dcmkd.models.registry import register_model
from dcmkd.models.resnet_cifar import BasicBlock, conv3x3, projection


class Bottleneck(nn.Module):
    """conv1×1-BN-ReLU, conv3×3(stride)-BN-ReLU, conv1×1(×4)-BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = conv3x3(mid, mid, stride), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (projection(cin, cout, stride) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ImageNetResNet(Backbone):
    input_size = 224

    def __init__(self, bottleneck: bool, layers: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        self.bottleneck, self.num_classes = bottleneck, num_classes
        self.block_type = "Bottleneck" if bottleneck else "BasicBlock"
        stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        cin = self.set_stem("conv1", stem, 64, 4)
        expansion = 4 if bottleneck else 1
        for i, n in enumerate(layers):
            cin = self.add_stage(f"conv{i + 2}_x", cin,
                                 StageSpec(n, 64 * 2 ** i * expansion, 1 if i == 0 else 2))
        self.head = ClassifierHead(cin, num_classes)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        def block(cin: int, stride: int) -> nn.Module:
            if self.bottleneck:
                return Bottleneck(cin, spec.width, stride)
            return BasicBlock(cin, spec.width, stride, shortcut="B")

        return nn.Sequential(*[block(in_channels if i == 0 else spec.width,
                                     spec.stride if i == 0 else 1)
                               for i in range(spec.blocks)]), spec.width


@register_model("resnet18", "imagenet", 1000, "ResNet-18 (ImageNet), basic blocks 2/2/2/2")
def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(False, (2, 2, 2, 2), num_classes)


@register_model("resnet34", "imagenet", 1000, "ResNet-34 (ImageNet), basic blocks 3/4/6/3")
def resnet34(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(False, (3, 4, 6, 3), num_classes)


@register_model("resnet50", "imagenet", 1000, "ResNet-50 (ImageNet), bottleneck blocks 3/4/6/3")
def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(True, (3, 4, 6, 3), num_classes)
