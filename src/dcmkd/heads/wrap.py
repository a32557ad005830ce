"""Bring your own model: DCM auxiliary classifiers for any PyTorch image classifier.

:func:`wrap_model` turns an ``nn.Module`` whose forward maps images ``[B, C, H, W]`` to logits
``[B, classes]`` into a :class:`WrappedNetwork`, a :class:`~dcmkd.heads.MultiExitNetwork` (same
forward contract: a list of logits C1, C2, C3, …) usable by every method and by
:func:`dcmkd.losses.dcm_loss`.

How it works (readings of this library; the papers describe zoo backbones only):

- **Tracing.** One sample input runs through the model (eval mode, no gradient, so nothing in
  the model changes) with a hook on every sub-module, recording the order of calls, the tensors
  in and out, and their spatial sizes.
- **Taps** (DCM supplementary §2: a branch taps a stage output just *before* a down-sampling).
  The calls of the model's direct children are scanned in execution order; a child whose output
  is not a feature map, or that down-samples twice or more (e.g. a ``features`` Sequential), is
  replaced by its own children. Head modules (global pooling, flatten, linear) end the scan.
  Wherever the spatial size halves — inside a module, or between two modules (functional
  pooling) — the module called just before is a tap. C2 takes the last one, C3 the one before,
  C4 the one before that. ``taps=`` names the modules instead (any depth).
- **Branches.** A branch copies the modules that process the tap's output one after another up
  to the feature map the model's head receives (found by following the traced tensors), so its
  path has exactly as many down-samplings as C1's, then global average pooling and a linear
  layer. The copy is re-initialised (each layer's own ``reset_parameters``); ``blocks=`` keeps
  only the first blocks of each copied ``nn.Sequential`` of blocks. With ``width`` ≠ 1 (``kind=
  "narrow"`` halves it, as in paper Table 4) or a ``block_factory``, the copy is rebuilt instead:
  every block by ``block_factory(in_ch, out_ch, stride)`` (known automatically for dcmkd's zoo
  blocks), convolutions and BatchNorms at the new width, parameter-free layers as they are.
  ``kind="apfc"`` puts paper Table 4's 4×4-pool + linear head on the tap instead.
- **C1** is the model's own forward, run unchanged; tap features are grabbed with forward hooks
  installed for the duration of the call only, so :meth:`WrappedNetwork.export` (a deep copy of
  the model) has no hooks and exactly the model's ``state_dict`` keys.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn

from dcmkd.heads.builder import AUX_KINDS, APFCHead, AuxiliaryClassifier, MultiExitNetwork
from dcmkd.heads.builder import parse_classifiers
from dcmkd.heads.tables import CLASSIFIER_NAMES
from dcmkd.models import mobilenet, resnet_cifar, resnet_imagenet, wrn
from dcmkd.models.base import ClassifierHead, inference
from dcmkd.registry import UnknownNameError, check_choice

#: ``block_factory(in_channels, out_channels, stride) -> block``
BlockFactory = Callable[[int, int, int], nn.Module]
#: a value for every auxiliary classifier, or one per classifier name (``{"C2": 2.0}``)
PerClassifier = Union[float, int, str, None, Mapping[str, Union[float, int, str, None]]]

DEFAULT_SAMPLE_SHAPE = (2, 3, 32, 32)
_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


# -- tracing ------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Call:
    """One call of a sub-module during the traced forward."""

    name: str
    module: nn.Module
    start: int
    parent: "_Call | None"
    input: torch.Tensor | None
    output: torch.Tensor | None = None
    end: int = -1
    version: int = 0  # the output's in-place version counter when the call returned

    @property
    def hw_in(self) -> tuple[int, int] | None:
        return _hw(self.input)

    @property
    def hw_out(self) -> tuple[int, int] | None:
        return _hw(self.output)


def _hw(t: torch.Tensor | None) -> tuple[int, int] | None:
    return tuple(t.shape[-2:]) if isinstance(t, torch.Tensor) and t.dim() == 4 else None


def _downsamplings(before: tuple[int, int] | None, after: tuple[int, int] | None) -> int:
    """How many halvings of the spatial size separate ``before`` from ``after`` (0 if unknown)."""
    if before is None or after is None or after[0] >= before[0]:
        return 0
    return round(math.log2(before[0] / after[0]))


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[list[_Call], object]:
    """Run ``model(x)`` in inference mode and record every sub-module call."""
    calls: list[_Call] = []
    stack: list[_Call] = []
    tick = itertools.count()

    def pre(name: str):
        def hook(m: nn.Module, args: tuple) -> None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            call = _Call(name, m, next(tick), stack[-1] if stack else None, inp)
            calls.append(call)
            stack.append(call)
        return hook

    def post(m: nn.Module, args: tuple, out: object) -> None:
        call = stack.pop()
        call.end = next(tick)
        if isinstance(out, torch.Tensor):
            call.output, call.version = out, out._version

    handles = []
    for name, m in model.named_modules():
        if name:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    try:
        with inference(model):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _is_head(call: _Call) -> bool:
    """A call that belongs to the classifier head: global pooling, or a non-map output."""
    if call.hw_out is None:
        return True
    if call.hw_out != (1, 1) or not isinstance(call.module, _POOLS):
        return False
    adaptive = isinstance(call.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    return adaptive or call.hw_in != (1, 1)


def _main_sequence(calls: list[_Call]) -> list[_Call]:
    """The calls at the "sensible depth": the model's children, containers that are not a
    feature-map module with at most one down-sampling opened up into their own children."""
    children: dict[_Call | None, list[_Call]] = {}
    for c in calls:
        children.setdefault(c.parent, []).append(c)

    def expand(c: _Call) -> list[_Call]:
        kids = children.get(c, [])
        simple = c.hw_in is not None and c.hw_out is not None and \
            _downsamplings(c.hw_in, c.hw_out) <= 1
        if kids and not simple:
            return [d for k in kids for d in expand(k)]
        return [c] if c.input is not None and c.output is not None else []

    return [d for c in children.get(None, []) for d in expand(c)]


@dataclass
class _Structure:
    """What tracing found: the body calls (before the head), the tap candidates in execution
    order, and the feature map the model's head receives."""

    body: list[_Call]
    candidates: list[_Call]
    final: torch.Tensor


def _structure(calls: list[_Call], model_name: str) -> _Structure:
    seq = _main_sequence(calls)
    body: list[_Call] = []
    for c in seq:
        if _is_head(c):
            break
        body.append(c)
    if not body:
        raise ValueError(f"tracing {model_name} found no module that outputs a feature map "
                         "[B, C, H, W]; pass taps=[...] naming the modules to tap")
    candidates = []
    for prev, c in zip(body, body[1:]):
        if _downsamplings(prev.hw_out, c.hw_in) or _downsamplings(c.hw_in, c.hw_out):
            candidates.append(prev)
    return _Structure(body, candidates, body[-1].output)  # type: ignore[arg-type]


def _chain(calls: list[_Call], tap: _Call, final: torch.Tensor) -> list[_Call]:
    """The module calls that take the tap's output one after another up to ``final``: each is
    the outermost call whose input is the previous call's output tensor (the same object)."""
    t, after, chain = tap.output, tap.end, []
    while t is not final:
        nxt = min((c for c in calls if c.start > after and c.input is t and c.hw_out is not None),
                  key=lambda c: c.start, default=None)
        if nxt is None:
            where = f"after '{chain[-1].name}'" if chain else f"of '{tap.name}'"
            raise ValueError(
                f"cannot copy the later stages for tap '{tap.name}': the output {where} is "
                "next used by something that is not a module (a function call in forward, "
                "e.g. F.relu or x + y) before the feature map reaches the head. Use modules "
                "(nn.ReLU, …) in forward, tap a later module, or use kind='apfc'")
        chain.append(nxt)
        t, after = nxt.output, nxt.end
    return chain


# -- building branches --------------------------------------------------------------------------
def _is_block(m: nn.Module) -> bool:
    """A building block: a module with parameters whose class is not one of torch's layers."""
    return not type(m).__module__.startswith("torch.") and \
        any(True for _ in m.parameters(recurse=True))


def _is_block_sequence(m: nn.Module) -> bool:
    return type(m) is nn.Sequential and len(m) > 0 and all(_is_block(c) for c in m)


def _keep_blocks(n: int, blocks: int | str | None) -> int:
    if blocks is None:
        return n
    if blocks == "half":
        return max(1, n // 2)
    return min(n, int(blocks))


def zoo_block_factory(block: nn.Module) -> BlockFactory | None:
    """The constructor of a dcmkd zoo block as ``factory(in_ch, out_ch, stride)``, keeping the
    block's own options (shortcut type, dropout, expansion); None for other modules."""
    if isinstance(block, resnet_cifar.BasicBlock):
        shortcut = "B" if isinstance(block.shortcut, nn.Sequential) else "A"
        return lambda cin, cout, s: resnet_cifar.BasicBlock(cin, cout, s, shortcut)
    if isinstance(block, (resnet_cifar.PreActBottleneck, resnet_imagenet.Bottleneck,
                          mobilenet.DepthwiseSeparable)):
        return type(block)
    if isinstance(block, wrn.WideBasic):
        p = block.dropout.p if isinstance(block.dropout, nn.Dropout) else 0.0
        return lambda cin, cout, s: wrn.WideBasic(cin, cout, s, p)
    if isinstance(block, mobilenet.InvertedResidual):
        first = block.conv[0][0]
        t = first.out_channels // first.in_channels if len(block.conv) == 3 else 1
        return lambda cin, cout, s: mobilenet.InvertedResidual(cin, cout, s, t)
    return None


class _Rebuilder:
    """Rebuilds copied modules at ``scale`` × their output width (see the module docstring)."""

    def __init__(self, scale: float, factory: BlockFactory | None, blocks: int | str | None):
        self.scale, self.factory, self.blocks = scale, factory, blocks
        self.trimmed = False

    def width(self, c: int) -> int:
        return max(1, round(c * self.scale))

    def __call__(self, name: str, m: nn.Module, x: torch.Tensor, cin: int,
                 factory: BlockFactory | None = None) -> tuple[nn.Module, torch.Tensor, int]:
        """``m`` rebuilt for ``cin`` input channels; also ``m``'s original output on ``x`` and
        the new output width."""
        y = m(x)
        cout, stride = y.shape[1], max(1, round(x.shape[-2] / y.shape[-2]))
        if type(m) is nn.Sequential:
            kids = list(m.named_children())
            if _is_block_sequence(m):
                kids = kids[:_keep_blocks(len(kids), self.blocks)]
                self.trimmed = True
                factory = factory or self.factory or zoo_block_factory(m[0])
            layers, h = [], x
            for k, child in kids:
                new, h, cin = self(f"{name}.{k}", child, h, cin, factory)
                layers.append(new)
            return nn.Sequential(*layers), y, cin
        if _is_block(m):
            build = factory or self.factory or zoo_block_factory(m)
            if build is None:
                raise ValueError(
                    f"cannot build '{name}' ({type(m).__name__}) at another width: pass "
                    "block_factory=lambda in_ch, out_ch, stride: YourBlock(...), or keep "
                    "width=1 to copy it")
            return build(cin, self.width(cout), stride), y, self.width(cout)
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if m.groups > 1 and not depthwise:
                raise ValueError(f"cannot change the width of the grouped convolution '{name}'; "
                                 "pass block_factory= or keep width=1")
            out = cin if depthwise else self.width(cout)
            return nn.Conv2d(cin, out, m.kernel_size, m.stride, m.padding, m.dilation,
                             cin if depthwise else 1, m.bias is not None, m.padding_mode), y, out
        if isinstance(m, nn.BatchNorm2d):
            return nn.BatchNorm2d(cin, m.eps, m.momentum, m.affine, m.track_running_stats), y, cin
        if not any(True for _ in m.parameters()):
            return copy.deepcopy(m), y, cin if cout == x.shape[1] else cout
        raise ValueError(f"cannot change the width of '{name}' ({type(m).__name__}); pass "
                         "block_factory= or keep width=1")


def reinitialise(module: nn.Module) -> None:
    """Fresh weights: every layer's own ``reset_parameters`` (PyTorch's default init)."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


def _copied_stages(chain: list[_Call], blocks: int | str | None) -> tuple[nn.Sequential, bool]:
    """A re-initialised deep copy of the chained modules, block sequences cut to ``blocks``."""
    stages = copy.deepcopy(nn.Sequential(*[c.module for c in chain]))  # keeps shared modules
    trimmed = False
    for i, m in enumerate(stages):
        if _is_block_sequence(m):
            stages[i] = m[:_keep_blocks(len(m), blocks)]
            trimmed = True
    reinitialise(stages)
    return stages, trimmed


# -- a user's description of the stages ---------------------------------------------------------
#: in ``head=``, unless the model has a module of that name: ``torch.flatten(x, 1)``
FLATTEN = "flatten"


@dataclass(frozen=True)
class StagePaths:
    """A classifier's stages as its user describes them, for the stage-wise methods (SSKD,
    FitNets, AT, NST, fixed_backbone; :class:`dcmkd.methods.stages.ModulePlan` runs and checks
    them): ``stages[i]`` the dotted module paths stage i + 1 runs, ``head`` those that take the
    last stage's map to the logits (:data:`FLATTEN` for ``torch.flatten(x, 1)``)."""

    stages: tuple[tuple[str, ...], ...]
    head: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module, stages: Sequence[Sequence[str] | str],
           head: Sequence[str] | str) -> "StagePaths":
        """Checked: every stage and the head non-empty, every path one of ``model``'s modules
        (or :data:`FLATTEN` in the head); a string stands for a one-module stage or head."""
        name = type(model).__name__
        if isinstance(stages, str) or not stages:
            raise ValueError(f"stages= for {name}: a list of stages, each a list of module "
                             "names, e.g. [['conv1', 'bn1', 'relu', 'layer1'], ['layer2']]; "
                             f"got {stages!r}")
        groups = tuple((s,) if isinstance(s, str) else tuple(s) for s in stages)
        tail = (head,) if isinstance(head, str) else tuple(head or ())
        empty = [i + 1 for i, g in enumerate(groups) if not g]
        if empty or not tail:
            where = f"stage {empty[0]}" if empty else "head="
            raise ValueError(f"{where} of {name} names no module; every stage and the head "
                             "run at least one")
        for p in (*(p for g in groups for p in g), *tail):
            if not isinstance(p, str):
                raise ValueError(f"stages=/head= of {name}: module names are strings, got {p!r}")
        for p in (p for g in groups for p in g):
            submodule(model, p, f"module of {name} in stages=")
        for p in tail:
            if p != FLATTEN or p in dict(model.named_modules()):
                submodule(model, p, f"module of {name} in head=")
        return cls(groups, tail)


# -- the wrapped network ------------------------------------------------------------------------
class WrappedNetwork(MultiExitNetwork):
    """A user model with DCM auxiliary classifiers; built by :func:`wrap_model`.

    ``backbone`` is the user's model itself (not a copy), so training the wrapper trains it.
    ``forward`` returns ``[C1, C2, …]``: C1 is the model's own forward, the others
    ``branches[name](tap output)``. :meth:`export` returns a copy of the user's model.
    ``stage_paths``: the stages the user described (:class:`StagePaths`), or None.
    """

    def __init__(self, model: nn.Module, branches: Sequence[AuxiliaryClassifier],
                 num_classes: int, sample_shape: Sequence[int],
                 stage_paths: StagePaths | None = None):
        # MultiExitNetwork.__init__ reads a zoo Backbone's declared stages; this class shares
        # its contract (classifier_names, export, downsamplings), not its stage-based forward.
        nn.Module.__init__(self)
        self.backbone = model
        self.branches = nn.ModuleDict({b.name: b for b in branches})
        self.num_classes = num_classes
        self.sample_shape = tuple(sample_shape)
        self.stage_paths = stage_paths
        self.training = model.training  # the model's mode, as given
        self.branches.train(model.training)

    @property
    def taps(self) -> dict[str, str]:
        """Classifier name → the tapped module's name in the user's model."""
        return {name: b.tap for name, b in self.branches.items()}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats: dict[str, torch.Tensor] = {}

        def keep(name: str, tap: str):
            def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
                if name in feats:
                    raise RuntimeError(f"tapped module '{tap}' ran twice in one forward")
                feats[name] = out
            return hook

        handles = [self.backbone.get_submodule(b.tap).register_forward_hook(keep(n, b.tap))
                   for n, b in self.branches.items()]
        try:
            logits = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        missing = [b.tap for n, b in self.branches.items() if n not in feats]
        if missing:
            raise RuntimeError(f"tapped module(s) {', '.join(missing)} did not run")
        return [logits, *(b(feats[n]) for n, b in self.branches.items())]

    def export(self) -> nn.Module:
        """A copy of the user's model (its own class, its own ``state_dict`` keys, the trained
        weights), without auxiliary classifiers."""
        return copy.deepcopy(self.backbone)

    def downsamplings(self, input_size: int | None = None) -> dict[str, int]:
        """Number of down-samplings on the path to each classifier's global pooling, measured by
        tracing a forward pass at ``input_size`` (default: the sample wrap_model traced)."""
        size = input_size or self.sample_shape[-1]
        x = sample_batch(self.backbone, (1, *self.sample_shape[1:-2], size, size))
        calls, _ = _trace(self.backbone, x)
        sizes = {"C1": _hw(_structure(calls, type(self.backbone).__name__).final)}
        hooks = [b.head.register_forward_pre_hook(
            lambda m, args, n=n: sizes.__setitem__(n, _hw(args[0])))
            for n, b in self.branches.items()]
        try:
            with inference(self):
                self(x)
        finally:
            for h in hooks:
                h.remove()
        return {n: _downsamplings((size, size), hw) for n, hw in sizes.items()}


def sample_batch(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A probe batch of ``shape``: seeded normal noise on the model's device."""
    ref = next(itertools.chain(model.parameters(), model.buffers()), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    return x.to(ref.device) if ref is not None else x


def _per(value: PerClassifier, name: str, default: object, what: str) -> object:
    if isinstance(value, Mapping):
        for key in value:
            check_choice(f"classifier in {what}", key, CLASSIFIER_NAMES[1:])
        return value.get(name, default)
    return default if value is None else value


def wrap_model(model: nn.Module, num_classes: int | None = None, *,
               taps: Sequence[str] | Mapping[str, str] | None = None,
               classifiers: str | Sequence[str] | None = None, kind: str = "default",
               blocks: PerClassifier = None, width: PerClassifier = 1.0,
               block_factory: BlockFactory | None = None,
               sample_input: torch.Tensor | Sequence[int] | None = None,
               stages: Sequence[Sequence[str] | str] | None = None,
               head: Sequence[str] | str | None = None) -> WrappedNetwork:
    """Give any image classifier DCM auxiliary classifiers (see the module docstring).

    ``model``: maps ``[B, C, H, W]`` images to ``[B, classes]`` logits; wrapped in place.
    ``num_classes``: checked against the model's output (inferred when None).
    ``taps``: module names to tap (any depth; a list is assigned C2 = the latest, C3, C4 in
    execution order; a mapping gives ``{"C2": name, ...}``); None finds them by tracing.
    ``classifiers``: which auxiliary classifiers (``"C2,C3"`` by default, ``"C1"`` for none).
    ``kind``: ``default``, ``narrow`` (half width) or ``apfc`` (paper Table 4).
    ``blocks``: keep this many blocks (an int, or ``"half"``) of each copied Sequential of blocks.
    ``width``: width multiplier of the copied stages (the paper's ResNet tables double C2's).
    ``blocks``/``width`` may be per classifier: ``width={"C2": 2}, blocks={"C3": "half"}``.
    ``block_factory(in_ch, out_ch, stride)``: builds one block when the copy is rebuilt.
    ``sample_input``: a batch the model accepts, or its shape (default ``(2, 3, 32, 32)``).
    ``stages``, ``head``: the model's stages for SSKD, FitNets, AT, NST and fixed_backbone, as
    lists of its module names run in the order of its forward (:class:`StagePaths`; e.g.
    ``stages=[["conv1", "bn1", "relu", "layer1"], ["layer2"], ["layer3"]],
    head=["avgpool", "flatten", "fc"]``); checked against its forward when a method uses them
    (:class:`dcmkd.methods.stages.ModulePlan`).
    """
    check_choice("auxiliary classifier kind", kind, AUX_KINDS)
    model_name = type(model).__name__
    if (stages is None) != (head is None):
        raise ValueError(f"wrap_model({model_name}): give stages= and head= together (the "
                         "modules of each stage, and those from the last stage to the logits)")
    paths = None if stages is None else StagePaths.of(model, stages, head)  # type: ignore[arg-type]
    if sample_input is None or not isinstance(sample_input, torch.Tensor):
        x = sample_batch(model, tuple(sample_input or DEFAULT_SAMPLE_SHAPE))
    else:
        x = sample_input
    try:
        calls, out = _trace(model, x)
    except Exception as e:  # the user's forward can raise anything
        raise ValueError(f"could not run {model_name} on a sample input of shape "
                         f"{tuple(x.shape)}: {type(e).__name__}: {e}. Pass sample_input= (a "
                         "batch, or its shape, that the model accepts)") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"{model_name}'s forward must return logits [B, classes]; it returned "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)}")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ValueError(f"{model_name} outputs {out.shape[1]} classes, not {num_classes}")
    num_classes = int(out.shape[1])

    structure = _structure(calls, model_name)
    by_name: dict[str, list[_Call]] = {}
    for c in calls:
        by_name.setdefault(c.name, []).append(c)
    if taps is None:
        names = parse_classifiers(classifiers)
        found = list(reversed(structure.candidates))  # C2 = the latest
        if len(found) < len(names):
            raise ValueError(
                f"tracing {model_name} on a {tuple(x.shape)} input found "
                f"{len(found)} down-sampling point(s) with a module before them "
                f"({', '.join(c.name for c in found) or 'none'}), "
                f"{len(names)} needed for {', '.join(names)}; pass taps=[...] naming the "
                "modules to tap, or a larger sample_input=")
        tap_of = {n: c.name for n, c in zip(names, found)}
    else:
        tap_of = _user_taps(model, taps, classifiers, calls)
    for cname, tap in tap_of.items():
        if len(by_name.get(tap, [])) != 1:
            raise ValueError(f"module '{tap}' (for {cname}) runs {len(by_name.get(tap, []))} "
                             "times in one forward; tap a module that runs exactly once")
        if by_name[tap][0].hw_out is None:
            raise ValueError(f"module '{tap}' (for {cname}) does not output a feature map "
                             "[B, C, H, W]")
        if by_name[tap][0].output._version != by_name[tap][0].version:
            raise ValueError(f"the output of '{tap}' (for {cname}) is changed in place later "
                             "(e.g. by nn.ReLU(inplace=True)); tap that later module instead")

    branches = [_build_branch(cname, by_name[tap][0], calls, structure.final, num_classes, kind,
                              _per(blocks, cname, None, "blocks"),  # type: ignore[arg-type]
                              float(_per(width, cname, 1.0, "width")),  # type: ignore[arg-type]
                              block_factory)
                for cname, tap in tap_of.items()]
    return WrappedNetwork(model, branches, num_classes, x.shape, paths)


def submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    """``model``'s sub-module at the dotted ``path``; an unknown one is refused in one line that
    lists the closest names and the model's children (``what``: e.g. "module … to tap")."""
    modules = dict(model.named_modules())
    if path not in modules or path == "":
        everything = [n for n in modules if n]
        close = difflib.get_close_matches(path, everything, n=3, cutoff=0.5)
        shown = list(dict.fromkeys([*close, *(n for n in model._modules)]))
        raise UnknownNameError(what, path, shown)
    return modules[path]


def _user_taps(model: nn.Module, taps: Sequence[str] | Mapping[str, str],
               classifiers: str | Sequence[str] | None, calls: list[_Call]) -> dict[str, str]:
    names = list(taps.values()) if isinstance(taps, Mapping) else list(taps)
    for tap in names:
        submodule(model, tap, f"module of {type(model).__name__} to tap")
    if isinstance(taps, Mapping):
        for key in taps:
            check_choice("classifier", key, CLASSIFIER_NAMES[1:])
        if classifiers is not None and set(parse_classifiers(classifiers)) != set(taps):
            raise ValueError("taps= names the classifiers; drop classifiers= or make them agree")
        return {n: taps[n] for n in CLASSIFIER_NAMES[1:] if n in taps}
    first = {c.name: c.start for c in reversed(calls)}
    missing = [t for t in names if t not in first]
    if missing:
        raise ValueError(f"module(s) {', '.join(missing)} never run in the forward pass")
    ordered = sorted(names, key=first.__getitem__, reverse=True)  # latest first: C2, C3, C4
    cnames = (parse_classifiers(classifiers) if classifiers is not None
              else CLASSIFIER_NAMES[1:1 + len(ordered)])
    if len(ordered) > 3 or len(cnames) != len(ordered):
        raise ValueError(f"{len(ordered)} taps for classifiers {', '.join(cnames) or 'none'}; "
                         "give one tap per auxiliary classifier (at most 3: C2, C3, C4)")
    return dict(zip(cnames, ordered))


def _build_branch(cname: str, tap: _Call, calls: list[_Call], final: torch.Tensor,
                  num_classes: int, kind: str, blocks: int | str | None, width: float,
                  factory: BlockFactory | None) -> AuxiliaryClassifier:
    assert tap.output is not None
    cin = tap.output.shape[1]
    if kind == "apfc":
        return AuxiliaryClassifier(cname, tap.name, kind, None, nn.Sequential(),
                                   APFCHead(cin, num_classes)).to(tap.output.device,
                                                                  tap.output.dtype)
    if blocks is not None and blocks != "half" and not (isinstance(blocks, int) and blocks > 0):
        raise ValueError(f"blocks must be a positive int or 'half', got {blocks!r}")
    scale = width * (0.5 if kind == "narrow" else 1.0)
    chain = _chain(calls, tap, final)
    if scale == 1.0 and factory is None:
        stages, trimmed = _copied_stages(chain, blocks)
        cout = final.shape[1]
    else:
        rebuild = _Rebuilder(scale, factory, blocks)
        layers, c = [], cin
        for call in chain:
            with inference(call.module):
                new, _, c = rebuild(call.name, call.module, call.input, c)
            layers.append(new)
        stages, trimmed, cout = nn.Sequential(*layers), rebuild.trimmed, c
    if blocks is not None and not trimmed:
        raise ValueError(f"blocks= for {cname}: the stages after '{tap.name}' have no "
                         "nn.Sequential of blocks to shorten")
    head = ClassifierHead(cout, num_classes)
    branch = AuxiliaryClassifier(cname, tap.name, kind, None, stages, head)
    branch.to(device=tap.output.device, dtype=tap.output.dtype)
    try:
        with inference(branch):
            got = branch.stages(tap.output)
    except Exception as e:
        raise ValueError(f"the branch built for {cname} (tap '{tap.name}') does not run on the "
                         f"tap's output: {type(e).__name__}: {e}") from e
    if _hw(got) != _hw(final) or got.shape[1] != cout:
        raise ValueError(f"the branch for {cname} ends with a {tuple(got.shape[1:])} map, the "
                         f"model's head receives {tuple(final.shape[1:])}: the copy does not "
                         "down-sample like the model (check block_factory's stride)")
    return branch


__all__ = ["WrappedNetwork", "wrap_model", "zoo_block_factory", "BlockFactory", "StagePaths",
           "FLATTEN", "submodule", "sample_batch", "reinitialise"]
