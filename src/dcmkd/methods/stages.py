"""Stage partitions of a backbone for stage-wise feature distillation (SSKD, AT, NST, FitNets).

SSKD (sskd-paper.md, "Stage-by-Stage Training Scheme", Eq. 5) writes a backbone as
``T_B = T_K ∘ … ∘ T_1`` and distils the output ``f_i`` of every stage ``T_i``. This module cuts
any zoo :class:`~dcmkd.models.base.Backbone` into K such stages, and runs them one after another.

**Units.** A backbone's declared units are its stem and its stages (``stage_info``), each of which
ends just before a down-sampling (DESIGN.md, "a backbone declares its stages").

**The default 4-stage partition** (paper "Implementation": "we treat each resolution
down-sampling layer as a breakpoint"; "excluding the first convolution layer and pooling layer,
there are mainly four sets of residual blocks"):

- consecutive units with no down-sampling between them are merged, so the ImageNet ResNets'
  stem (7×7/2 conv + max-pool, stride 4) joins ``conv2_x`` and ResNet-18/34/50 give
  ``conv1+conv2_x, conv3_x, conv4_x, conv5_x`` at 56, 28, 14, 7 px; MobileNetV2's units
  collapse to its five resolutions;
- **reading**: a stride-1 stem is a breakpoint of its own, so the CIFAR ResNets give the
  paper's four stages ``conv1, conv2_x, conv3_x, conv4_x`` (the paper never spells out its
  CIFAR partition; with three residual stages this is the only way to its 4 stages);
- with more than 4 breakpoints the earliest stages are merged (VGG-16:
  ``conv1+conv2, conv3, conv4, conv5``; DenseNet-121: ``conv1+dense1, dense2, dense3, dense4``).

**K < 4 stages** (paper Table 2: "'1 stage' means that only one mimic loss is added at the
final feature"; "'2 stages' means separating the backbone network into two parts"). **Reading**:
the earliest stages of the 4-stage partition are merged, so K stages end at the last K
breakpoints (1 stage: the final feature only).

**K = 5–8 stages** (paper Table 3: "based on the original 4-stages partition, '5 stages' means
that the first stage is evenly divided into two halves, '6 stages' means that the first two
stages are evenly divided, and so on"): the first K − 4 stages of the 4-stage partition are each
cut in two. **Reading** of "evenly divided": a stage is a sequence of *layers* (the children of
its stem/stage ``nn.Sequential`` s: residual blocks, dense layers, conv/BN pairs), where a layer
without parameters (ReLU, pooling, dropout) stays with the layer before it (a leading one with
the layer after it), so a cut never separates a BN from its in-place ReLU; the first half gets
``ceil(n / 2)`` of the ``n`` layers. ResNet-20's stem (conv, BN-ReLU) splits into the raw 3×3
conv output and its BN-ReLU; its 3-block stages into 2 + 1 blocks; ResNet-56's 9-block stages
into 5 + 4. A stage of a single layer cannot be halved (an error names it).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.models.base import Backbone

#: the paper's recommended partition: the resolution down-sampling points
DEFAULT_STAGES = 4
#: finer partitions halve stages of the 4-stage one, each at most once (paper Table 3)
MAX_STAGES = 2 * DEFAULT_STAGES


@dataclass(frozen=True)
class Segment:
    """One stage of a partition: the backbone's modules ``paths`` (dotted names, applied in
    order), its output ``channels`` and cumulative ``stride`` at the backbone's design input."""

    name: str
    paths: tuple[str, ...]
    channels: int
    stride: int


def _param_free(m: nn.Module) -> bool:
    return next(m.parameters(), None) is None


def _layers(unit: nn.Module, path: str) -> list[tuple[str, ...]]:
    """A unit as a list of layers (each a tuple of module paths), see the module note."""
    if not (isinstance(unit, nn.Sequential) and len(unit) > 1):
        return [(path,)]
    layers: list[tuple[str, ...]] = []
    pending: list[str] = []
    for name, child in unit.named_children():
        p = f"{path}.{name}"
        if _param_free(child):
            if layers:
                layers[-1] = layers[-1] + (p,)
            else:
                pending.append(p)
        else:
            layers.append((*pending, p))
            pending = []
    if pending:  # only parameter-free children: one layer
        layers.append(tuple(pending))
    return layers


class StagePartition:
    """A backbone cut into stages (see the module note); runs stages without copying modules.

    ``segments[i]`` describes stage i + 1; :meth:`run` applies a range of stages. The partition
    keeps references to the backbone's own modules (it is not an ``nn.Module`` and registers
    nothing), so the network's ``state_dict`` is unchanged.
    """

    def __init__(self, backbone: Backbone, stages: int | Sequence[str] = DEFAULT_STAGES):
        if not isinstance(backbone, Backbone):
            raise TypeError(f"stage partitions need a zoo Backbone (declared stem and stages), "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        unit_names = backbone.stage_names
        unit_paths = ["stem", *[f"stages.{n}" for n in backbone.stages.keys()]]
        self.unit_names = unit_names
        self._unit_layers = [_layers(backbone.get_submodule(p), p) for p in unit_paths]
        # a segment is a list of (unit index, layer index) pairs
        pieces = self._plan(backbone, stages)
        self.segments: list[Segment] = self._describe(backbone, pieces)
        self._modules = [[backbone.get_submodule(p) for p in s.paths] for s in self.segments]

    # -- planning -------------------------------------------------------------------------
    def _unit(self, u: int) -> list[tuple[int, int]]:
        return [(u, j) for j in range(len(self._unit_layers[u]))]

    def _plan(self, backbone: Backbone, stages: int | Sequence[str]) -> list[list[tuple[int, int]]]:
        n_units = len(self.unit_names)
        if not isinstance(stages, int):
            ends = list(stages)
            for e in ends:
                backbone.stage(e)  # clear error for an unknown name
            idx = [self.unit_names.index(e) for e in ends]
            if idx != sorted(set(idx)) or not idx or idx[-1] != n_units - 1:
                raise ValueError(f"stage ends {ends} must be increasing unit names ending with "
                                 f"the last unit '{self.unit_names[-1]}'")
            pieces, start = [], 0
            for i in idx:
                pieces.append([p for u in range(start, i + 1) for p in self._unit(u)])
                start = i + 1
            return pieces
        if not 1 <= stages <= MAX_STAGES:
            raise ValueError(f"number of stages must be 1..{MAX_STAGES}, got {stages}")
        # breakpoints: unit ends followed by a down-sampling, and a stride-1 stem (reading)
        strides = [s.stride for s in backbone.stage_info]
        pieces = [self._unit(0)]
        for u in range(1, n_units):
            keep_stem = u == 1 and strides[0] == 1
            if strides[u] == strides[u - 1] and not keep_stem:
                pieces[-1] = pieces[-1] + self._unit(u)   # no down-sampling in between
            else:
                pieces.append(self._unit(u))
        base = min(stages, DEFAULT_STAGES)
        while len(pieces) > base:                  # merge the earliest
            pieces[0:2] = [pieces[0] + pieces[1]]
        j = 0
        while len(pieces) < base:                  # a backbone with fewer units: halve
            if j >= len(pieces):
                raise ValueError(f"cannot cut {self._model()} into {stages} stages")
            pieces[j:j + 1] = self._halve(pieces[j])
            j += 2
        for j in range(0, 2 * (stages - base), 2):  # K > 4: halve the first K - 4 stages
            pieces[j:j + 1] = self._halve(pieces[j])
        return pieces

    def _halve(self, piece: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        if len(piece) < 2:
            raise ValueError(f"stage '{self._name(piece)}' of {self._model()} is a single layer "
                             "and cannot be split in halves")
        cut = math.ceil(len(piece) / 2)
        return [piece[:cut], piece[cut:]]

    def _model(self) -> str:
        return getattr(self.backbone, "model_name", type(self.backbone).__name__)

    def _name(self, piece: list[tuple[int, int]]) -> str:
        parts: list[str] = []
        for u in dict.fromkeys(p[0] for p in piece):
            js = [j for (v, j) in piece if v == u]
            whole = len(js) == len(self._unit_layers[u])
            parts.append(self.unit_names[u] if whole else
                         f"{self.unit_names[u]}[{js[0]}:{js[-1] + 1}]")
        return "+".join(parts)

    def _describe(self, backbone: Backbone, pieces: list[list[tuple[int, int]]]) -> list[Segment]:
        paths = [tuple(p for (u, j) in piece for p in self._unit_layers[u][j])
                 for piece in pieces]
        size = backbone.input_size
        meta = copy.deepcopy(backbone).to("meta")
        x = torch.empty(1, 3, size, size, device="meta")
        out = []
        with torch.no_grad():
            for piece, ps in zip(pieces, paths):
                for p in ps:
                    x = meta.get_submodule(p)(x)
                out.append(Segment(self._name(piece), ps, int(x.shape[1]),
                                   max(1, round(size / x.shape[-1]))))
        return out

    # -- running --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.segments)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def channels(self) -> list[int]:
        return [s.channels for s in self.segments]

    def modules(self, i: int) -> list[nn.Module]:
        """The backbone modules of stage ``i`` (0-based)."""
        return list(self._modules[i])

    def parameters(self, i: int) -> list[nn.Parameter]:
        return [p for m in self._modules[i] for p in m.parameters()]

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for m in self._modules[i]:
            x = m(x)
        return x

    def run(self, x: torch.Tensor, stop: int | None = None, start: int = 0) -> list[torch.Tensor]:
        """Outputs of stages ``start .. stop - 1`` (default: all) from ``x``, the input of
        stage ``start`` (the image when ``start = 0``)."""
        outs = []
        for i in range(start, len(self.segments) if stop is None else stop):
            x = self.run_stage(i, x)
            outs.append(x)
        return outs

    def describe(self) -> list[dict]:
        return [{"name": s.name, "channels": s.channels, "stride": s.stride,
                 "modules": list(s.paths)} for s in self.segments]

    def __repr__(self) -> str:
        return f"StagePartition({self._model()}: {', '.join(self.names)})"


def partition_stages(backbone: Backbone, stages: int | Sequence[str] = DEFAULT_STAGES
                     ) -> StagePartition:
    """Cut ``backbone`` into ``stages`` stages (an int 1–8, or the names of the units at which
    the stages end); see the module note for the rule."""
    return StagePartition(backbone, stages)


def resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize a feature map to ``size`` = (H, W): adaptive average pooling when it is at least as
    large in both dimensions, bilinear interpolation otherwise (the paper resizes "as described
    in Zagoruyko and Komodakis (2017)", who interpolate; for an integer down-scaling the average
    pool equals bilinear interpolation at half-pixel centres)."""
    size = (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class StageAdapter(nn.Module):
    """The student-side adapter of SSKD ("Implementation"): "if the feature maps from teacher and
    student have different number of channels, we just add an additional convolution layer with
    1×1 kernel size to student … only used in the training phase for loss computation. If they
    have different spatial resolutions, we just resize the student's feature map."

    A 1×1 convolution (with bias; the paper says only "a convolution layer") when the channel
    counts differ or ``always`` is set, else the identity. The student map is resized to the
    teacher's (:func:`resize_to`) before the projection (the two commute). The adapter belongs
    to the method, never to the student network, so the exported student has no trace of it.
    """

    def __init__(self, student_channels: int, teacher_channels: int, always: bool = False):
        super().__init__()
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.proj: nn.Module = (nn.Conv2d(student_channels, teacher_channels, 1)
                                if always or student_channels != teacher_channels
                                else nn.Identity())

    def forward(self, student: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.proj(resize_to(student, size))


__all__ = ["DEFAULT_STAGES", "MAX_STAGES", "Segment", "StagePartition", "partition_stages",
           "resize_to", "StageAdapter"]
