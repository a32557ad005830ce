"""The backbone contract every zoo model follows.

A backbone is ``stem → stages → head``. The stem counts as the first tappable stage (the papers'
``conv1``), so ``stage_info[0]`` describes the stem and ``stage_info[i]`` (i ≥ 1) the i-th stage.
Each stage is declared with its output channels and cumulative stride (timm's ``feature_info``),
so auxiliary classifiers and feature losses are sized without a dummy forward pass.

A family also knows how to build *more* of itself: :meth:`Backbone.make_stage` builds a stage of
the family's own block type with a given block count, width and stride, and
:meth:`Backbone.make_head` builds the family's classifier head. The auxiliary-classifier builder
(:mod:`dcmkd.heads`) uses only these two methods, which is how one rule serves every family.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import nn

from dcmkd.registry import check_choice


@dataclass(frozen=True)
class StageInfo:
    """One tappable stage: its name, output channels and cumulative stride w.r.t. the input."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class StageSpec:
    """A stage to build from a family's own block: ``blocks`` blocks of output ``width``.

    ``stride`` is that of the stage's first block (2 = the stage down-samples). ``width`` is the
    output width for ResNet/WRN/MobileNet/VGG families (a bottleneck's inner width is width/4) and
    the growth rate for DenseNets. ``expansion`` is MobileNetV2's t. ``widths`` gives one width
    per block where they differ (the CIFAR MobileNet's conv1..conv5); ``width`` is then the last.
    """

    blocks: int
    width: int
    stride: int = 2
    expansion: int | None = None
    widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.widths is not None and len(self.widths) != self.blocks:
            raise ValueError(f"StageSpec: {len(self.widths)} widths for {self.blocks} blocks")

    @property
    def block_widths(self) -> tuple[int, ...]:
        return self.widths if self.widths is not None else (self.width,) * self.blocks

    def scaled(self, factor: float) -> "StageSpec":
        """The same stage with every width multiplied by ``factor`` (the ``narrow`` kind)."""
        def sc(w: int) -> int:
            return max(1, int(round(w * factor)))
        return replace(self, width=sc(self.width),
                       widths=None if self.widths is None else tuple(map(sc, self.widths)))

    def with_blocks(self, blocks: int) -> "StageSpec":
        return replace(self, blocks=blocks,
                       widths=None if self.widths is None else self.widths[-blocks:])


class ClassifierHead(nn.Module):
    """``pre`` (e.g. BN-ReLU of pre-activation nets, MobileNetV2's 1×1 conv) → global average
    pool → optional dropout → linear."""

    def __init__(self, in_features: int, num_classes: int, pre: nn.Module | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.pre = pre if pre is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.pre(x)).flatten(1)
        return self.fc(self.dropout(x))


class Backbone(nn.Module):
    """Base class of every zoo model: ``stem``, ``stages`` (an ordered ``nn.ModuleDict``), ``head``.

    Subclasses build those three modules, fill :attr:`stage_info` and implement
    :meth:`make_stage`, :meth:`make_head` (and set :attr:`block_type`).
    """

    #: name of the family's building block, shown by ``dcmkd describe``
    block_type: str = "block"
    #: the input resolution the model was designed for (used for MAC counts)
    input_size: int = 32
    #: how auxiliary branches copy the later stages when the supplementary material gives no
    #: table (:func:`dcmkd.heads.tables.derived_branches`): ``halve`` every copied stage's
    #: blocks (the ResNet tables' pattern) or ``keep_first`` (WRN, Table 3: the first copied
    #: stage whole, the later ones halved)
    branch_rule: str = "halve"

    def __init__(self) -> None:
        super().__init__()
        self.stem: nn.Module = nn.Identity()
        self.stages = nn.ModuleDict()
        self.head: nn.Module = nn.Identity()
        self.stage_info: list[StageInfo] = []
        self.stage_specs: dict[str, StageSpec] = {}
        self.num_classes = 0

    def set_stem(self, name: str, module: nn.Module, channels: int, stride: int) -> int:
        """Install the stem (the first tappable stage); returns its output channels."""
        self.stem = module
        self.stage_info = [StageInfo(name, channels, stride)]
        return channels

    def add_stage(self, name: str, in_channels: int, spec: StageSpec) -> int:
        """Build a stage with :meth:`make_stage`, append it and record its spec, channels and
        cumulative stride; returns its output channels."""
        module, out = self.make_stage(in_channels, spec)
        self.stages[name] = module
        self.stage_specs[name] = spec
        self.stage_info.append(StageInfo(name, out, self.stage_info[-1].stride * spec.stride))
        return out

    # -- structure -------------------------------------------------------------------------
    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stage_info]

    def stage(self, name: str) -> StageInfo:
        check_choice("stage", name, self.stage_names)
        return next(s for s in self.stage_info if s.name == name)

    @property
    def num_features(self) -> int:
        return self.stage_info[-1].channels

    # -- forward ---------------------------------------------------------------------------
    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All stage outputs, stem first, in :attr:`stage_info` order."""
        x = self.stem(x)
        feats = [x]
        for stage in self.stages.values():
            x = stage(x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x)[-1]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages.values():
            x = stage(x)
        return self.head(x)

    def forward_intermediates(self, x: torch.Tensor,
                              taps: Sequence[str] | None = None
                              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the outputs of the named stages (all stages when ``taps`` is None)."""
        feats = self.forward_stages(x)
        names = self.stage_names if taps is None else list(taps)
        by_name = dict(zip(self.stage_names, feats))
        for n in names:
            self.stage(n)  # clear error for an unknown name
        return self.head(feats[-1]), {n: by_name[n] for n in names}

    # -- building more of the same family -------------------------------------------------
    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        """A new stage of this family's own blocks; returns it and its output channels."""
        raise NotImplementedError

    def make_head(self, in_channels: int, num_classes: int,
                  width: int | None = None) -> nn.Module:
        """A new classifier head like this backbone's own (``width``: MobileNetV2's 1×1 conv)."""
        return ClassifierHead(in_channels, num_classes)

    def initialize(self, module: nn.Module) -> None:
        """Initialise ``module`` (e.g. a new auxiliary branch) as this family initialises its own
        layers, so a branch built from the backbone's blocks also starts like them."""
        init_weights(module)

    def export(self) -> "Backbone":
        """A deep copy (for symmetry with :class:`dcmkd.heads.MultiExitNetwork.export`)."""
        return copy.deepcopy(self)


@contextlib.contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradient, restoring every sub-module's mode afterwards (probing a
    network's structure with a forward pass)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def official_init(module: nn.Module) -> None:
    """The official DCM code's init (Zagoruyko's WRN utilities): He-normal *fan-in*
    convolutions and linear layers, BatchNorm weight ~ U(0, 1), zero biases
    (``protocol=official``; the zoo's own init is :func:`init_weights`)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.0, 1.0)
            nn.init.zeros_(m.bias)


def init_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit BN, zero biases: the init of He et al. and WRN."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):  # SyncBN too
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
