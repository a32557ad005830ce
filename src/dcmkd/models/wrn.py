"""Wide ResNets (Zagoruyko & Komodakis 2016), WRN-d-k for CIFAR.

Pre-activation basic blocks (BN-ReLU-conv3×3-BN-ReLU [dropout] conv3×3), ``(d-4)/6`` per stage,
widths 16k/32k/64k; 1×1 projection shortcut from the pre-activated input where the shape changes,
as in the WRN and official DCM code. ``dropout`` is the paper's WRN-28-10(+): p = 0.3 "after the
first layer of every block" (DCM §4.4, SPEC.md §3), placed as in WRN's own code, which the DCM
paper follows: on the activation that feeds the second convolution, between the two
convolutions. Branches built from this family inherit it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.models.base import Backbone, ClassifierHead, StageSpec, init_weights
from dcmkd.models.registry import register_model
from dcmkd.models.resnet_cifar import bn_relu, conv3x3


class WideBasic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(cout, cout)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(pre)))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(Backbone):
    block_type = "WideBasic"
    input_size = 32
    #: auxiliary branches by supplementary Table 3's pattern: the first copied stage whole
    branch_rule = "keep_first"

    def __init__(self, depth: int, widen: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.dropout, self.num_classes = dropout, num_classes
        cin = self.set_stem("conv1", conv3x3(3, 16), 16, 1)
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            cin = self.add_stage(f"conv{i + 2}_x", cin, StageSpec(n, width, 1 if i == 0 else 2))
        self.head = self.make_head(cin, num_classes)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        return nn.Sequential(*[
            WideBasic(in_channels if i == 0 else spec.width, spec.width,
                      spec.stride if i == 0 else 1, self.dropout)
            for i in range(spec.blocks)]), spec.width

    def make_head(self, in_channels: int, num_classes: int,
                  width: int | None = None) -> nn.Module:
        return ClassifierHead(in_channels, num_classes, pre=bn_relu(in_channels))


def _wrn(depth: int, widen: int):
    def build(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen, num_classes, dropout)

    build.__doc__ = f"WRN-{depth}-{widen}; ``dropout`` after the first conv of every block."
    return build


for _d, _k in ((28, 10), (28, 4), (16, 2), (16, 4), (16, 8), (40, 2), (40, 4), (22, 8)):
    register_model(f"wrn{_d}_{_k}", "cifar", 100,
                   f"WRN-{_d}-{_k}, pre-act basic blocks, widths {16*_k}/{32*_k}/{64*_k}")(
        _wrn(_d, _k))
