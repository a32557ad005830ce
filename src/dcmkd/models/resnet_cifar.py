"""CIFAR ResNets (He et al. 2016): ResNet-20/32/44/56/110 with basic blocks and ResNet-164 with
pre-activation bottleneck blocks (He et al., "Identity mappings in deep residual networks").

Stages: ``conv1`` (3×3 stem, 16 channels), ``conv2_x``, ``conv3_x``, ``conv4_x`` at strides 1, 1,
2, 4; global average pooling and a linear classifier.

Shortcuts: the basic-block nets use He et al.'s CIFAR option A (parameter-free: strided identity,
zero-padded channels), which gives the published 0.27M / 0.85M / 1.7M parameters; ResNet-164
uses 1×1 projection shortcuts from the pre-activated input, as the pre-activation paper does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.models.base import Backbone, ClassifierHead, StageSpec, init_weights
from dcmkd.models.registry import register_model


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class PadShortcut(nn.Module):
    """He et al.'s option A: subsample by ``stride`` and zero-pad the extra channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra > 0 else x


def projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    """He et al.'s option B shortcut: 1×1 conv (stride) + BN."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN, + shortcut, ReLU. ``shortcut`` "A" (zero-pad, CIFAR) or "B"
    (1×1 projection, ImageNet) where the shape changes. Option A cannot drop channels, so a
    block narrower than its input (only the ``narrow`` C4 branch, which taps the 16-channel
    stem with 8-channel blocks) takes the projection whatever ``shortcut`` says."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A" and cout >= cin:
            self.shortcut = PadShortcut(cin, cout, stride)
        else:
            self.shortcut = projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1×1 → BN-ReLU-conv3×3(stride) → BN-ReLU-conv1×1(×4), + shortcut.
    ``cout`` is the block's output width (inner width cout/4)."""

    expansion = 4

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = cout // self.expansion
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(mid), conv3x3(mid, mid, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(mid), nn.Conv2d(mid, cout, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        short = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + short


def bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class CifarResNet(Backbone):
    """3-stage CIFAR ResNet; ``block`` is BasicBlock or PreActBottleneck."""

    input_size = 32

    def __init__(self, block: type[nn.Module], blocks_per_stage: int,
                 widths: tuple[int, int, int], num_classes: int):
        super().__init__()
        self.block = block
        self.block_type = block.__name__
        self.preact = block is PreActBottleneck
        self.num_classes = num_classes
        stem_width = 16
        stem = (conv3x3(3, stem_width) if self.preact
                else nn.Sequential(conv3x3(3, stem_width), *bn_relu(stem_width)))
        cin = self.set_stem("conv1", stem, stem_width, 1)
        for i, width in enumerate(widths):
            spec = StageSpec(blocks_per_stage, width, stride=1 if i == 0 else 2)
            cin = self.add_stage(f"conv{i + 2}_x", cin, spec)
        self.head = self.make_head(cin, num_classes)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        layers = [self.block(in_channels if i == 0 else spec.width, spec.width,
                             spec.stride if i == 0 else 1) for i in range(spec.blocks)]
        return nn.Sequential(*layers), spec.width

    def make_head(self, in_channels: int, num_classes: int,
                  width: int | None = None) -> nn.Module:
        return ClassifierHead(in_channels, num_classes,
                              pre=bn_relu(in_channels) if self.preact else None)


def _basic(depth: int):
    assert (depth - 2) % 6 == 0
    n = (depth - 2) // 6

    def build(num_classes: int = 100) -> CifarResNet:
        return CifarResNet(BasicBlock, n, (16, 32, 64), num_classes)

    build.__doc__ = f"ResNet-{depth} for CIFAR: basic blocks, {n} per stage, widths 16/32/64."
    return build


for _depth in (20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}", "cifar", 100,
                   f"ResNet-{_depth} (He et al.), basic blocks, {(_depth - 2) // 6}/stage")(
        _basic(_depth))


@register_model("resnet164", "cifar", 100,
                "ResNet-164, pre-activation bottleneck blocks, 18/stage, outputs 64/128/256")
def resnet164(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(PreActBottleneck, 18, (64, 128, 256), num_classes)
