"""The one auxiliary-classifier builder and the multi-exit network.

Rule (DCM §3.2 "Setting of Q", supplementary §2): a branch taps a stage output just before a
down-sampling and runs its own copy of the later stages — built with the backbone's own
:meth:`~dcmkd.models.base.Backbone.make_stage`, with the block counts and widths of its
:class:`~dcmkd.heads.tables.BranchSpec` — then the family's head (pooling and a linear layer).

Kinds (paper Table 4): ``default`` (the table), ``narrow`` (the table at half the widths / growth
rates), ``apfc`` (average-pool to 4×4, flatten, one linear layer, at the same taps).
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Sequence

import torch
from torch import nn

from dcmkd.heads.tables import (CLASSIFIER_NAMES, DEFAULT_CLASSIFIERS, BranchSpec,
                                branch_table)
from dcmkd.models.base import Backbone
from dcmkd.models.registry import create_model
from dcmkd.registry import UnknownNameError, check_choice

AUX_KINDS = ("default", "apfc", "narrow")


class AuxiliaryClassifier(nn.Module):
    """``stages`` (a Sequential of built stages, empty for ``apfc``) then ``head``."""

    def __init__(self, name: str, tap: str, kind: str, spec: BranchSpec | None,
                 stages: nn.Sequential, head: nn.Module):
        super().__init__()
        self.name, self.tap, self.kind, self.spec = name, tap, kind, spec
        self.stages, self.head = stages, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


class APFCHead(nn.Sequential):
    """Paper Table 4 "APFC": adaptive average pooling to 4×4, flatten, one linear layer."""

    def __init__(self, in_channels: int, num_classes: int, size: int = 4):
        super().__init__(nn.AdaptiveAvgPool2d(size), nn.Flatten(1),
                         nn.Linear(in_channels * size * size, num_classes))


def build_branch(backbone: Backbone, name: str, spec: BranchSpec, num_classes: int,
                 kind: str = "default") -> AuxiliaryClassifier:
    """Build one auxiliary classifier of ``kind`` from ``spec`` with the backbone's own blocks."""
    check_choice("auxiliary classifier kind", kind, AUX_KINDS)
    cin = backbone.stage(spec.tap).channels
    if kind == "apfc":
        branch = AuxiliaryClassifier(name, spec.tap, kind, None, nn.Sequential(),
                                     APFCHead(cin, num_classes))
        backbone.initialize(branch)
        return branch
    if kind == "narrow":
        spec = spec.scaled(0.5)
    stages = []
    for stage_spec in spec.stages:
        stage, cin = backbone.make_stage(cin, stage_spec)
        stages.append(stage)
    head = backbone.make_head(cin, num_classes, spec.head_width)
    branch = AuxiliaryClassifier(name, spec.tap, kind, spec, nn.Sequential(*stages), head)
    backbone.initialize(branch)  # the backbone's own init (He fan-out convs, N(0, 0.01) FC)
    return branch


def parse_classifiers(selection: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise a classifier selection to auxiliary names in output order.

    Accepts ``None`` (the paper's default C2, C3), ``"C2,C3"``, the paper's Table 3 notation
    ``"C1+C2C3C4"``, ``"C1"`` / ``""`` (no auxiliary classifier) or an iterable of names.
    """
    if selection is None:
        return DEFAULT_CLASSIFIERS
    if isinstance(selection, str):
        text = selection.replace("+", ",").replace(" ", "").upper()
        names = [tok for part in text.split(",") if part
                 for tok in ("C" + t for t in part.split("C") if t)]
    else:
        names = [str(n).upper() for n in selection]
    for n in names:
        check_choice("classifier", n, CLASSIFIER_NAMES)
    return tuple(n for n in CLASSIFIER_NAMES[1:] if n in names)


class MultiExitNetwork(nn.Module):
    """A backbone with auxiliary classifiers.

    ``forward`` returns a list of logits in the fixed order C1 (the backbone's own classifier),
    then C2, C3, C4 as selected: ``classifier_names`` says which. :meth:`export` returns the plain
    backbone, whose ``state_dict`` has no auxiliary weights.
    """

    def __init__(self, backbone: Backbone, branches: Sequence[AuxiliaryClassifier] = ()):
        super().__init__()
        self.backbone = backbone
        self.branches = nn.ModuleDict({b.name: b for b in branches})
        self._tap_index = [backbone.stage_names.index(b.tap) for b in branches]

    @property
    def classifier_names(self) -> list[str]:
        return ["C1", *self.branches.keys()]

    @property
    def num_classifiers(self) -> int:
        return 1 + len(self.branches)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.backbone.forward_stages(x)
        logits = [self.backbone.forward_head(feats[-1])]
        logits += [b(feats[i]) for b, i in zip(self.branches.values(), self._tap_index)]
        return logits

    def export(self) -> nn.Module:
        """A copy of the plain backbone (no auxiliary classifier) for inference and deployment:
        the backbone's own export (a timm/torchvision network: the plain library model)."""
        return self.backbone.export()

    def downsamplings(self, input_size: int | None = None) -> dict[str, int]:
        """Number of down-samplings on the path to each classifier's pooling, measured by a
        forward pass on the meta device (no compute) at ``input_size``."""
        size = input_size or self.backbone.input_size
        meta = copy.deepcopy(self).to("meta")
        heads = {"C1": meta.backbone.head, **{n: b.head for n, b in meta.branches.items()}}
        seen: dict[str, int] = {}
        for n, h in heads.items():
            h.register_forward_pre_hook(lambda m, args, n=n: seen.__setitem__(n, args[0].shape[-1]))
        with torch.no_grad():
            meta(torch.empty(1, 3, size, size, device="meta"))
        return {n: round(math.log2(size / seen[n])) for n in heads}


def available_classifiers(backbone: Backbone, model_name: str | None = None) -> list[str]:
    return list(branch_table(model_name or getattr(backbone, "model_name", None), backbone))


def build_multi_exit(backbone: Backbone | str, num_classes: int | None = None, *,
                     classifiers: str | Iterable[str] | None = None, kind: str = "default",
                     table: dict[str, BranchSpec] | None = None,
                     **model_options) -> MultiExitNetwork:
    """A :class:`MultiExitNetwork` for a zoo model name or a built backbone.

    ``classifiers`` selects the auxiliary classifiers (see :func:`parse_classifiers`); ``kind``
    is ``default``, ``apfc`` or ``narrow``; ``table`` overrides the published/derived branches.
    """
    if isinstance(backbone, str):
        backbone = create_model(backbone, num_classes, **model_options)
    elif model_options:
        raise TypeError("model options go with a model name, not a built backbone")
    num_classes = backbone.num_classes
    check_choice("auxiliary classifier kind", kind, AUX_KINDS)
    specs = table if table is not None else branch_table(getattr(backbone, "model_name", None),
                                                         backbone)
    branches = []
    for name in parse_classifiers(classifiers):
        if name not in specs:
            raise UnknownNameError(
                f"auxiliary classifier for {getattr(backbone, 'model_name', 'this backbone')}",
                name, specs)
        branches.append(build_branch(backbone, name, specs[name], num_classes, kind))
    return MultiExitNetwork(backbone, branches)
