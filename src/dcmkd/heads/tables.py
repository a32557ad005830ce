"""Where the DCM auxiliary classifiers go and what they contain: the supplementary material's
Tables 1–6 (decoded in SPEC.md §2), written as data for the one builder in
:mod:`dcmkd.heads.builder`.

A :class:`BranchSpec` names the backbone stage it taps and the stages it builds of the
backbone's own block type; the first built stage carries the down-sampling the tapped stage was
about to meet, so every classifier sees the same number of down-samplings (the paper's rule).
C2 taps the later stage, C3 the earlier one, C4 (WRN-28-10 only, Table 3 ablation) the earliest.

Backbones without a table get branches from :func:`derived_branches`, a rule chosen here (the
papers give none) that reproduces the ResNet-110 and ResNet-164 tables exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from dcmkd.models.base import Backbone, StageSpec

#: classifier names in output order; C1 is the backbone's own final classifier
CLASSIFIER_NAMES = ("C1", "C2", "C3", "C4")
#: the paper's default set (two auxiliary classifiers)
DEFAULT_CLASSIFIERS = ("C2", "C3")


@dataclass(frozen=True)
class BranchSpec:
    """An auxiliary classifier: ``tap`` (a backbone stage name), the ``stages`` it builds, and
    ``head_width`` (MobileNetV2's final 1×1 conv; None for the family's plain head)."""

    tap: str
    stages: tuple[StageSpec, ...]
    head_width: int | None = None

    def scaled(self, factor: float) -> "BranchSpec":
        """Every width (growth rate for DenseNets) times ``factor``: the paper's ``narrow`` kind."""
        hw = None if self.head_width is None else int(round(self.head_width * factor))
        return replace(self, stages=tuple(s.scaled(factor) for s in self.stages), head_width=hw)


def _s(blocks: int, width: int, stride: int = 2, expansion: int | None = None) -> StageSpec:
    return StageSpec(blocks, width, stride, expansion)


#: supplementary Tables 1–6 (SPEC.md §2). Widths are output widths; for DenseNet growth rates.
AUX_TABLES: dict[str, dict[str, BranchSpec]] = {
    # Table 1, ResNet-110: C3 conv2_x → conv3_x 9×32, conv4_x 9×64; C2 conv3_x → conv4_x 18×128
    "resnet110": {"C2": BranchSpec("conv3_x", (_s(18, 128),)),
                  "C3": BranchSpec("conv2_x", (_s(9, 32), _s(9, 64)))},
    # Table 1, ResNet-164 (reading: bottleneck blocks of output 128/256, C2 output 512)
    "resnet164": {"C2": BranchSpec("conv3_x", (_s(18, 512),)),
                  "C3": BranchSpec("conv2_x", (_s(9, 128), _s(9, 256)))},
    # Table 3, WRN-28-10 (C4 for the Table 3 ablation only)
    "wrn28_10": {"C2": BranchSpec("conv3_x", (_s(4, 1280),)),
                 "C3": BranchSpec("conv2_x", (_s(4, 320), _s(2, 640))),
                 "C4": BranchSpec("conv1", (_s(4, 160, 1), _s(2, 320), _s(2, 640)))},
    # Table 3, WRN-28-4
    "wrn28_4": {"C2": BranchSpec("conv3_x", (_s(4, 512),)),
                "C3": BranchSpec("conv2_x", (_s(4, 128), _s(2, 256)))},
    # Table 2, DenseNet-40-12: (layers, growth); each built stage starts with its own transition
    "densenet40_12": {"C2": BranchSpec("dense2", (_s(12, 36),)),
                      "C3": BranchSpec("dense1", (_s(12, 12), _s(6, 12)))},
    # Table 4, CIFAR MobileNet: C3 conv5 → conv6 (s2) + conv7–11 (6 × 512), conv12–13 (2 × 1024);
    # C2 conv11 → conv12–13 (2 × 2048). The official code gives C3 3 blocks after conv6; the
    # table gives 5 (SPEC.md §2 reading: follow the table).
    "mobilenet": {"C2": BranchSpec("conv6_11", (_s(2, 2048),)),
                  "C3": BranchSpec("conv1_5", (_s(6, 512), _s(2, 1024)))},
    # Table 5, ResNet-18: C3 conv3_x → conv4_x 1×256, conv5_x 2×512; C2 conv4_x → conv5_x 2×1024
    "resnet18": {"C2": BranchSpec("conv4_x", (_s(2, 1024),)),
                 "C3": BranchSpec("conv3_x", (_s(1, 256), _s(2, 512)))},
    # Table 5, ResNet-50 (output widths; inner = output / 4)
    "resnet50": {"C2": BranchSpec("conv4_x", (_s(3, 4096),)),
                 "C3": BranchSpec("conv3_x", (_s(3, 1024), _s(2, 2048)))},
    # Table 6, MobileNetV2 (t, c, n, s) rows and the final 1×1 conv width (block18)
    "mobilenetv2": {"C2": BranchSpec("block14_16", (_s(1, 480, 1, 6),), head_width=1920),
                    "C3": BranchSpec("block11_13", (_s(3, 160, 2, 6), _s(1, 320, 1, 3)),
                                     head_width=1280)},
}


def derived_branches(backbone: Backbone) -> dict[str, BranchSpec]:
    """Branches for a backbone without a published table (a reading of this library).

    The down-sampling stages are those whose spec has stride 2. Ck (k = 2, 3, 4) taps the stage
    just before the (k-1)-th last down-sampling stage; when the first stage keeps the stem's
    resolution, the stem is the earliest tap (as WRN-28-10's C4 taps conv1). C2 copies the last
    stage with its block count at twice its width; C3 and C4 copy every later stage with half
    its blocks (at least one) at the same width: exactly the ResNet-110 and ResNet-164 tables.
    A family with ``branch_rule = "keep_first"`` (WRN) keeps the first copied stage whole and
    halves the later ones, supplementary Table 3's pattern (C3 = (n, n/2), C4 = (n, n/2, n/2)),
    which reproduces the WRN-28-10 and WRN-28-4 tables for every WRN depth.
    """
    names = backbone.stage_names
    down = [i for i, n in enumerate(names) if i > 0 and backbone.stage_specs[n].stride > 1]
    if len(names) > 1 and 1 not in down:  # the first stage keeps the stem's resolution:
        down.insert(0, 1)                 # the stem is one more tap (WRN-28-10's C4, Table 3)
    out: dict[str, BranchSpec] = {}
    for k, first in enumerate(reversed(down)):
        cname = CLASSIFIER_NAMES[k + 1] if k + 1 < len(CLASSIFIER_NAMES) else None
        if cname is None:
            break
        later = [backbone.stage_specs[n] for n in names[first:]]
        if cname == "C2":
            stages = tuple(replace(s, width=2 * s.width, widths=None) for s in later)
        else:
            keep = 1 if backbone.branch_rule == "keep_first" else 0
            stages = tuple(s if i < keep else s.with_blocks(max(1, s.blocks // 2))
                           for i, s in enumerate(later))
        out[cname] = BranchSpec(names[first - 1], stages)
    return out


def branch_table(model_name: str | None, backbone: Backbone) -> dict[str, BranchSpec]:
    """The published table for ``model_name`` when there is one, else the derived rule."""
    if model_name in AUX_TABLES:
        return AUX_TABLES[model_name]
    return derived_branches(backbone)
