"""VGG-16 with batch normalisation for CIFAR (the SSKD teacher).

Five stages of 3×3 conv-BN-ReLU layers (2, 2, 3, 3, 3 convs of 64, 128, 256, 512, 512); every stage
but the first starts with its 2×2 max-pool down-sampling, so a stage output is "just before a
down-sampling". The head max-pools the final map (2×2 at 32×32 input) to 1×1 and applies one linear layer (the common
CIFAR VGG; the SSKD paper does not give its VGG head).
"""
from __future__ import annotations

from torch import nn

from dcmkd.models.base import Backbone, ClassifierHead, StageSpec, init_weights
from dcmkd.models.registry import register_model


class VGG(Backbone):
    block_type = "ConvBNReLU"
    input_size = 32

    def __init__(self, layers: tuple[int, ...], widths: tuple[int, ...], num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        stem, cin = self.make_stage(3, StageSpec(layers[0], widths[0], 1))
        self.set_stem("conv1", stem, cin, 1)
        for i, (n, w) in enumerate(zip(layers[1:], widths[1:])):
            cin = self.add_stage(f"conv{i + 2}", cin, StageSpec(n, w, 2))
        self.head = self.make_head(cin, num_classes)
        init_weights(self)

    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if spec.stride == 2 else []
        cin = in_channels
        for w in spec.block_widths:
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            cin = w
        return nn.Sequential(*layers), cin

    def make_head(self, in_channels: int, num_classes: int,
                  width: int | None = None) -> nn.Module:
        return ClassifierHead(in_channels, num_classes, pre=nn.AdaptiveMaxPool2d(1))


@register_model("vgg16_bn", "cifar", 100, "VGG-16 with BN for CIFAR (SSKD teacher)")
def vgg16_bn(num_classes: int = 100) -> VGG:
    return VGG((2, 2, 3, 3, 3), (64, 128, 256, 512, 512), num_classes)
