"""MobileNets.

- ``mobilenet``: the CIFAR MobileNet of DML/DCM (SPEC.md §2 **reading**): a 3×3 stem conv of 32
  (``conv0``), then depthwise-separable blocks conv1..conv13 with widths 64, 128, 128, 256, 256
  (stride 1), conv6 512 s2, conv7–11 512, conv12 1024 s2, conv13 1024; average pool, linear.
  Stages: ``conv1_5`` (conv1..conv5), ``conv6_11``, ``conv12_13`` — the output of ``conv1_5`` is
  the paper's conv5 and that of ``conv6_11`` its conv11, where C3 and C2 tap.
- ``mobilenetv2``: MobileNetV2 (Sandler et al. 2018) for 224×224 ImageNet. Stages are the rows of
  its Table 2 and are named by the DCM supplementary's block numbers: ``block0`` (stem conv),
  ``block1``, ``block2_3``, ``block4_6``, ``block7_10``, ``block11_13``, ``block14_16``,
  ``block17``; the head's 1×1 conv 1280 is the paper's block18. ``StageSpec`` here is (t, c, n, s):
  ``expansion``, ``width``, ``blocks``, ``stride``.
"""
from __future__ import annotations

import torch
from torch import nn

from dcmkd.models.base import Backbone, ClassifierHead, StageSpec, init_weights
from dcmkd.models.registry import register_model


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class DepthwiseSeparable(nn.Sequential):
    """3×3 depthwise conv (stride) -BN-ReLU, 1×1 pointwise conv -BN-ReLU (MobileNet v1 block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(conv_bn_act(cin, cin, 3, stride, groups=cin), conv_bn_act(cin, cout, 1))


class MobileNetCifar(Backbone):
    block_type = "DepthwiseSeparable"
    input_size = 32

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        cin = self.set_stem("conv0", conv_bn_act(3, 32, 3), 32, 1)
        cin = self.add_stage("conv1_5", cin, StageSpec(5, 256, 1, widths=(64, 128, 128, 256, 256)))
        cin = self.add_stage("conv6_11", cin, StageSpec(6, 512, 2))
        cin = self.add_stage("conv12_13", cin, StageSpec(2, 1024, 2))
        self.head = ClassifierHead(cin, num_classes)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        layers, cin = [], in_channels
        for i, w in enumerate(spec.block_widths):
            layers.append(DepthwiseSeparable(cin, w, spec.stride if i == 0 else 1))
            cin = w
        return nn.Sequential(*layers), cin


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand (t) -BN-ReLU6, 3×3 depthwise (stride) -BN-ReLU6, 1×1
    project -BN; identity shortcut when stride 1 and same width."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers.append(conv_bn_act(cin, mid, 1, act=nn.ReLU6))
        layers += [conv_bn_act(mid, mid, 3, stride, groups=mid, act=nn.ReLU6),
                   conv_bn_act(mid, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(Backbone):
    block_type = "InvertedResidual"
    input_size = 224
    #: (name, t, c, n, s): MobileNetV2 paper Table 2, named by the DCM supplementary's blocks
    SETTINGS = (("block1", 1, 16, 1, 1), ("block2_3", 6, 24, 2, 2), ("block4_6", 6, 32, 3, 2),
                ("block7_10", 6, 64, 4, 2), ("block11_13", 6, 96, 3, 1),
                ("block14_16", 6, 160, 3, 2), ("block17", 6, 320, 1, 1))

    def __init__(self, num_classes: int, dropout: float = 0.2, head_width: int = 1280):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        cin = self.set_stem("block0", conv_bn_act(3, 32, 3, 2, act=nn.ReLU6), 32, 2)
        for name, t, c, n, s in self.SETTINGS:
            cin = self.add_stage(name, cin, StageSpec(n, c, s, expansion=t))
        self.head = self.make_head(cin, num_classes, head_width)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        layers, cin = [], in_channels
        for i in range(spec.blocks):
            layers.append(InvertedResidual(cin, spec.width, spec.stride if i == 0 else 1,
                                           spec.expansion or 6))
            cin = spec.width
        return nn.Sequential(*layers), cin

    def make_head(self, in_channels: int, num_classes: int,
                  width: int | None = None) -> nn.Module:
        width = width or 1280
        return ClassifierHead(width, num_classes, dropout=self.dropout,
                              pre=conv_bn_act(in_channels, width, 1, act=nn.ReLU6))


@register_model("mobilenet", "cifar", 100, "the CIFAR MobileNet of DML/DCM (13 dw-sep blocks)")
def mobilenet(num_classes: int = 100) -> MobileNetCifar:
    return MobileNetCifar(num_classes)


@register_model("mobilenetv2", "imagenet", 1000, "MobileNetV2 1.0 (ImageNet, 224×224)")
def mobilenetv2(num_classes: int = 1000, dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(num_classes, dropout)
