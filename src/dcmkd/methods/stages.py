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

**Stage plans.** What SSKD, FitNets, AT and NST use of a network's stages is the
:class:`StagePlan` protocol (plus :class:`ClassifierStagePlan` for a classifier's head). Three
plans satisfy it: the zoo partition above (:class:`StagePartition`), a torchvision ResNet-FPN
detector's (:class:`~dcmkd.models.detection.ResNetFPNPlan`), and a user's own classifier
described by its module names (:class:`ModulePlan`, from ``wrap_model(model, stages=…,
head=…)``). :func:`dcmkd.methods.sskd.stage_plan` picks the one of a network.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.heads.wrap import DEFAULT_SAMPLE_SHAPE, StagePaths, reinitialise, sample_batch
from dcmkd.models.base import Backbone, inference, init_weights

#: the paper's recommended partition: the resolution down-sampling points
DEFAULT_STAGES = 4
#: finer partitions halve stages of the 4-stage one, each at most once (paper Table 3)
MAX_STAGES = 2 * DEFAULT_STAGES


@runtime_checkable
class StagePlan(Protocol):
    """A network's backbone as K stages ``T_K ∘ … ∘ T_1`` (SSKD Eq. 5): what SSKD, FitNets, AT
    and NST use of it. ``run_stage(0, x)`` takes the input of stage 1 (the image batch, or a
    detector's transformed batch), ``run_stage(i, x)`` what stage ``i − 1`` returned.
    ``modules(i)`` are the network's own modules (no copies), the ones SSKD trains in stage i.
    A detector's FitNets/AT/NST also record features in the detector's own forward
    (:meth:`~dcmkd.models.detection.ResNetFPNPlan.record`), outside this protocol."""

    names: list[str]      # one per stage; FitNets' ``hint`` names a stage by its last unit
    channels: list[int]   # the width of each stage's feature (SSKD's adapters, the regressor)

    def __len__(self) -> int: ...

    def modules(self, i: int) -> list[nn.Module]: ...

    def run_stage(self, i: int, x: Any) -> Any: ...

    def run(self, x: Any, stop: int | None = None, start: int = 0) -> list[Any]: ...

    def feature(self, i: int, out: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """What is compared at stage ``i`` given its output ``out`` (a map, or a pyramid)."""
        ...

    @property
    def map_stages(self) -> list[int]:
        """The stages whose feature is one map (those AT and NST compare)."""
        ...


@runtime_checkable
class ClassifierStagePlan(StagePlan, Protocol):
    """A classifier's plan: also its task head (SSKD's head phase, Eq. 4; the CE of FitNets,
    AT and NST; fixed_backbone)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (what the head receives)."""
        ...

    def forward_head(self, x: torch.Tensor) -> torch.Tensor: ...

    def head_modules(self) -> list[nn.Module]: ...

    def reset_head(self) -> None:
        """Re-initialise the head (weights and BN statistics)."""
        ...


class _Stages:
    """``run`` from ``run_stage`` and ``__len__``; a plan whose stages all compare one map."""

    def __len__(self) -> int:
        raise NotImplementedError

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, x: torch.Tensor, stop: int | None = None, start: int = 0
            ) -> list[torch.Tensor]:
        """Outputs of stages ``start .. stop - 1`` (default: all) from ``x``, the input of
        stage ``start`` (the image when ``start = 0``)."""
        outs = []
        for i in range(start, len(self) if stop is None else stop):
            x = self.run_stage(i, x)
            outs.append(x)
        return outs

    def feature(self, i: int, out: torch.Tensor) -> torch.Tensor:
        return out

    @property
    def map_stages(self) -> list[int]:
        return list(range(len(self)))


def reset_head(backbone: Backbone) -> None:
    """Re-initialise a zoo backbone's task head (weights with the zoo's own init, BN statistics
    reset)."""
    for m in backbone.head.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    init_weights(backbone.head)


def not_described(model: nn.Module) -> TypeError:
    """The one-line refusal of a network whose stages are unknown, saying how to give them."""
    name = type(model).__name__
    return TypeError(
        f"{name} is not a zoo Backbone (declared stem and stages), so the stage-wise methods do "
        f"not know its stages: describe them as its module names in the order of its forward, "
        f"wrap_model(model, stages=[['conv1', 'bn1', 'relu', 'layer1'], ['layer2'], ...], "
        f"head=['avgpool', 'flatten', 'fc']), or the same stages= and head= in create_method's "
        f"model_options")


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


class StagePartition(_Stages):
    """A backbone cut into stages (see the module note); runs stages without copying modules.

    ``segments[i]`` describes stage i + 1; :meth:`run` applies a range of stages. The partition
    keeps references to the backbone's own modules (it is not an ``nn.Module`` and registers
    nothing), so the network's ``state_dict`` is unchanged. A :class:`ClassifierStagePlan`; its
    head is the backbone's ``head``.
    """

    def __init__(self, backbone: Backbone, stages: int | Sequence[str] = DEFAULT_STAGES):
        if not isinstance(backbone, Backbone):
            raise not_described(backbone)
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

    # -- the head -------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_head(x)

    def head_modules(self) -> list[nn.Module]:
        return [self.backbone.head]

    def reset_head(self) -> None:
        reset_head(self.backbone)

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


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


class ModulePlan(_Stages):
    """A user's own classifier cut into the stages its user names (a :class:`ClassifierStagePlan`).

    ``stages[i]``: the dotted module paths of ``model`` that stage i + 1 runs, in order; ``head``:
    those that take the last stage's map to the logits, where ``"flatten"`` (unless the model has
    a module of that name) is ``torch.flatten(x, 1)`` (:class:`~dcmkd.heads.wrap.StagePaths`). A
    parameter-free module (one ``nn.ReLU`` used at several places) may be listed more than once.
    The plan runs the model's own modules (no copies, nothing registered), so its
    ``state_dict`` is unchanged.

    **Checked at construction** on a probe batch (``sample_input``, a batch or its shape), in
    eval mode without gradient: every listed module must receive exactly (``torch.equal``) the
    tensor it receives in the model's own forward, and the head's output must equal the model's
    logits. Otherwise the forward does something the plan cannot see, a functional operation
    between modules (``F.relu``, ``torch.flatten``, ``x + y``, a residual sum, modules run in
    another order), and a one-line ``ValueError`` names the model and the first stage where it
    differs. Stage widths (``channels``) and strides come from the probe.
    **Reading**: the head is re-initialised (:meth:`reset_head`) with each layer's own
    ``reset_parameters``, PyTorch's default, as the user's model starts (the zoo's head gets the
    zoo's init).
    """

    def __init__(self, model: nn.Module, stages: Sequence[Sequence[str] | str] | StagePaths,
                 head: Sequence[str] | str | None = None, *,
                 sample_input: torch.Tensor | Sequence[int] = DEFAULT_SAMPLE_SHAPE):
        paths = stages if isinstance(stages, StagePaths) else \
            StagePaths.of(model, stages, head)  # type: ignore[arg-type]
        self.model, self.paths = model, paths
        self.model_name = type(model).__name__
        self._stage_steps = [[self._step(p) for p in g] for g in paths.stages]
        self._head_steps = [self._step(p) for p in paths.head]
        self._check_shared()
        x = sample_input if isinstance(sample_input, torch.Tensor) else \
            sample_batch(model, tuple(sample_input))
        shapes = self._verify(x)
        self.names: list[str] = ["+".join(g) for g in paths.stages]
        self.channels: list[int] = [int(sh[1]) for sh in shapes]
        self.strides: list[int] = [max(1, round(x.shape[-2] / sh[-2])) for sh in shapes]

    def _step(self, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The module at ``path``, else (``"flatten"`` in the head) ``torch.flatten(x, 1)``."""
        modules = dict(self.model.named_modules())
        return modules[path] if path in modules else _flatten

    def _check_shared(self) -> None:
        """Each module with parameters or buffers once, and never inside another listed one."""
        modules = dict(self.model.named_modules())
        listed = [p for g in self.paths.stages for p in g] + \
            [p for p in self.paths.head if p in modules]
        for p in dict.fromkeys(listed):
            stateful = any(True for _ in itertools.chain(modules[p].parameters(),
                                                          modules[p].buffers()))
            if stateful and listed.count(p) > 1:
                raise ValueError(f"'{p}' of {self.model_name} is listed {listed.count(p)} times "
                                 "in stages=/head=: a module with weights runs once")
            outer = next((q for q in listed if p.startswith(q + ".")), None)
            if outer is not None:
                raise ValueError(f"'{p}' of {self.model_name} is inside '{outer}', also listed "
                                 "in stages=/head=: list one of them")

    def _verify(self, x: torch.Tensor) -> list[torch.Size]:
        """Run the model, then the plan, on ``x`` (see the class note); the stage output
        shapes."""
        inputs: dict[str, list[Any]] = {}
        modules = dict(self.model.named_modules())

        def keep(path: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple) -> None:
                arg = args[0] if args else None   # cloned: an in-place module changes it later
                inputs.setdefault(path, []).append(
                    arg.detach().clone() if isinstance(arg, torch.Tensor) else arg)
            return hook

        listed = {p for g in self.paths.stages for p in g} | set(self.paths.head)
        with inference(self.model):
            hooks = [modules[p].register_forward_pre_hook(keep(p))
                     for p in listed if p in modules]
            try:
                logits = self.model(x)
            except Exception as e:  # the user's forward can raise anything
                raise ValueError(f"could not run {self.model_name} on a probe input of shape "
                                 f"{tuple(x.shape)}: {type(e).__name__}: {e}; pass "
                                 "sample_input= (a batch, or its shape, that it accepts)") from e
            finally:
                for h in hooks:
                    h.remove()
            return self._replay(x, inputs, logits)

    def _replay(self, x: torch.Tensor, inputs: dict[str, list[Any]],
                logits: Any) -> list[torch.Size]:
        """The plan on ``x``, each module's input compared with the forward's (``inputs``)."""
        seen: dict[str, int] = {}
        given, shapes = "the model's input", []
        groups = [*zip(self.paths.stages, self._stage_steps), (self.paths.head, self._head_steps)]
        for i, (paths, steps) in enumerate(groups):
            where = f"stage {i + 1} ('{'+'.join(paths)}')" if i < len(self.paths.stages) \
                else "the head"
            for p, step in zip(paths, steps):
                k = seen[p] = seen.get(p, -1) + 1
                if isinstance(step, nn.Module):   # not the flatten of the head
                    calls = inputs.get(p, [])
                    if k >= len(calls):
                        runs = f"runs only {len(calls)} time(s)" if calls else "does not run"
                        raise ValueError(f"'{p}' of {self.model_name} {runs} in its forward, "
                                         f"listed {k + 1} time(s) in stages=/head=")
                    if not (isinstance(calls[k], torch.Tensor) and torch.equal(calls[k], x)):
                        raise ValueError(
                            f"{self.model_name}'s forward differs from its stage plan at "
                            f"{where}: '{p}' does not receive {given}, so the forward has a "
                            "functional operation between them (e.g. F.relu, torch.flatten, "
                            "x + y) or runs its modules in another order; make it a module "
                            "(nn.ReLU, nn.Flatten) or list the modules as the forward runs them")
                x, given = step(x), f"the output of '{p}'"
            if i < len(self.paths.stages):
                if x.dim() != 4:
                    raise ValueError(f"stage {i + 1} of {self.model_name} ends with a "
                                     f"{tuple(x.shape)} tensor, not a feature map [B, C, H, W]: "
                                     "pooling and flatten go in head=")
                shapes.append(x.shape)
        if not (isinstance(logits, torch.Tensor) and torch.equal(x, logits)):
            raise ValueError(f"{self.model_name}'s forward differs from its stage plan after "
                             f"the head: its logits are not {given} (a functional operation "
                             "after it?); list the modules as the forward runs them")
        return shapes

    # -- running --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._stage_steps)

    def modules(self, i: int) -> list[nn.Module]:
        """The model's own modules of stage ``i`` (0-based), each once."""
        return list(dict.fromkeys(self._stage_steps[i]))  # type: ignore[arg-type]

    def run_stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        for step in self._stage_steps[i]:
            x = step(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[-1]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._head_steps:
            x = step(x)
        return x

    def head_modules(self) -> list[nn.Module]:
        return list(dict.fromkeys(s for s in self._head_steps if isinstance(s, nn.Module)))

    def reset_head(self) -> None:
        for m in self.head_modules():
            reinitialise(m)

    def describe(self) -> list[dict]:
        return [{"name": n, "channels": c, "stride": st, "modules": list(g)}
                for n, c, st, g in zip(self.names, self.channels, self.strides,
                                       self.paths.stages)]

    def __repr__(self) -> str:
        return (f"ModulePlan({self.model_name}: {', '.join(self.names)}; "
                f"head {'+'.join(self.paths.head)})")


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


__all__ = ["DEFAULT_STAGES", "MAX_STAGES", "StagePlan", "ClassifierStagePlan", "Segment",
           "StagePartition", "partition_stages", "ModulePlan", "reset_head", "not_described",
           "resize_to", "StageAdapter"]
