"""DenseNets for CIFAR (Huang et al. 2017).

- ``densenet40_12``: the basic (non-BC) DenseNet-40 with growth 12 used by DCM: 3×3 conv 16,
  three dense blocks of 12 BN-ReLU-conv3×3 layers, transitions BN-ReLU-conv1×1 (no compression)
  + 2×2 average pooling (SPEC.md §2 **reading**).
- ``densenet100_12``: the same family, 32 layers per block.
- ``densenet121_cifar``: DenseNet-BC-121 (growth 32, blocks 6/12/24/16, bottleneck 4k,
  compression 0.5) adapted to 32×32 as the SSKD teacher: 3×3 stem conv of 2k channels at stride 1
  and no max-pool (the usual CIFAR adaptation; the SSKD paper does not spell it out).

A stage is ``[transition] + dense block``: the transition is the stage's down-sampling, so a stage
output (the end of a dense block) is exactly "just before a down-sampling". ``StageSpec.width`` is
the growth rate and ``StageSpec.blocks`` the number of dense layers.
"""
from __future__ import annotations

import torch
from torch import nn

from dcmkd.models.base import Backbone, ClassifierHead, StageSpec, init_weights
from dcmkd.models.registry import register_model
from dcmkd.models.resnet_cifar import bn_relu, conv3x3


class DenseLayer(nn.Module):
    """BN-ReLU-conv3×3 (growth k), or with ``bottleneck`` BN-ReLU-conv1×1(4k) first (BC)."""

    def __init__(self, cin: int, growth: int, bottleneck: bool):
        super().__init__()
        layers: list[nn.Module] = []
        if bottleneck:
            layers += [*bn_relu(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)]
            cin = 4 * growth
        layers += [*bn_relu(cin), conv3x3(cin, growth)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.layers(x)], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1×1 then 2×2 average pooling (the DenseNet down-sampling)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(*bn_relu(cin), nn.Conv2d(cin, cout, 1, bias=False), nn.AvgPool2d(2))


class DenseNet(Backbone):
    block_type = "DenseLayer"
    input_size = 32

    def __init__(self, blocks: tuple[int, ...], growth: int, num_classes: int,
                 bottleneck: bool = False, compression: float = 1.0, stem_width: int = 16):
        super().__init__()
        self.bottleneck, self.compression, self.num_classes = bottleneck, compression, num_classes
        cin = self.set_stem("conv1", conv3x3(3, stem_width), stem_width, 1)
        for i, n in enumerate(blocks):
            cin = self.add_stage(f"dense{i + 1}", cin, StageSpec(n, growth, 1 if i == 0 else 2))
        self.head = self.make_head(cin, num_classes)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        layers: list[nn.Module] = []
        cin = in_channels
        if spec.stride == 2:
            cout = int(cin * self.compression)
            layers.append(Transition(cin, cout))
            cin = cout
        elif spec.stride != 1:
            raise ValueError("a DenseNet stage has stride 1 or 2")
        for _ in range(spec.blocks):
            layers.append(DenseLayer(cin, spec.width, self.bottleneck))
            cin += spec.width
        return nn.Sequential(*layers), cin

    def make_head(self, in_channels: int, num_classes: int,
                  width: int | None = None) -> nn.Module:
        return ClassifierHead(in_channels, num_classes, pre=bn_relu(in_channels))


@register_model("densenet40_12", "cifar", 100,
                "DenseNet-40 (k=12), basic non-BC, 3 dense blocks of 12 layers")
def densenet40_12(num_classes: int = 100) -> DenseNet:
    return DenseNet((12, 12, 12), 12, num_classes)


@register_model("densenet100_12", "cifar", 100,
                "DenseNet-100 (k=12), basic non-BC, 3 dense blocks of 32 layers")
def densenet100_12(num_classes: int = 100) -> DenseNet:
    return DenseNet((32, 32, 32), 12, num_classes)


@register_model("densenet121_cifar", "cifar", 100,
                "DenseNet-BC-121 (k=32) adapted to 32×32 (SSKD teacher)")
def densenet121_cifar(num_classes: int = 100) -> DenseNet:
    return DenseNet((6, 12, 24, 16), 32, num_classes, bottleneck=True, compression=0.5,
                    stem_width=64)
