"""torchvision ResNet-FPN detectors (Faster R-CNN with FPN, RetinaNet) for SSKD on detection.

SSKD's detection experiments (sskd-paper.md, "Object Detection", Tables 8 and 9) use FPN
(Lin et al. 2017a) and RetinaNet (Lin et al. 2017b) with ResNet-18/50 students and ResNet-101/152
teachers: "Feature pyramid network is treated as the backbone for both FPN and RetinaNet. For FPN,
we take the region proposal network and the fast r-cnn layers (*i.e.*, ROI pooling and
fully-connected layers) as task-head. For RetinaNet, we take the classification and regression
subnets as task-head." This module builds those detectors from torchvision's own parts (never
downloading weights), cuts their backbone into SSKD stages (:class:`ResNetFPNPlan`), names the
task-head (:func:`head_modules`) and freezes the backbone for the head phase
(:func:`freeze_backbone`).

**Pyramids.** ``fasterrcnn``: P2–P6 from C2–C5 (FPN paper §4.1: "P6 is simply a stride two
subsampling of P5", used by the RPN only; torchvision's ``LastLevelMaxPool``), level names
``'0','1','2','3','pool'`` (torchvision's, which its RoI pooler and anchor generator use).
``retinanet``: P3–P7 from C3–C5 (RetinaNet paper §4.1: "P6 is obtained via a 3×3 stride-2 conv
on C5, and P7 is computed by applying ReLU followed by a 3×3 stride-2 conv on P6"; torchvision's
``LastLevelP6P7``), level names ``'0','1','2','p6','p7'``. **torchvision's**
``retinanet_resnet50_fpn`` builds ``LastLevelP6P7(256, 256)``, whose ``use_P5`` makes P6 from
**P5**; its ``_v2`` variant (``LastLevelP6P7(2048, 256)``) and Detectron2's RetinaNet (top block
on ``res5``) use C5. The default here is the paper's C5 (``p6_from="c5"``); ``p6_from="p5"`` gives
torchvision's v1 model exactly (34,014,999 parameters at 91 classes, its documented figure).

**num_classes counts the background for both kinds** (torchvision's convention): class 0 is
background, object labels are 1..K, ``num_classes = K + 1``. Faster R-CNN's predictor needs it
(its softmax has a background column). torchvision's RetinaNet has no background class in its
sigmoid focal loss (one binary classifier per column), but its COCO model also uses 91 columns
with an unused column 0; with labels 1..K column 0 is never a positive, so it only learns to
output "no object" (256·9·A + A parameters spent on it), and detections carry labels 1..K
like Faster R-CNN's. Labels 0..K−1 with ``num_classes = K`` (the paper's K classifiers) also work
for RetinaNet but not for Faster R-CNN; keep K + 1 for both so one label map serves both.

**Normalisation and frozen layers** (paper silent; Detectron's practice for ImageNet backbones):
with ``backbone_weights`` the default is ``norm="frozen_bn"`` (FrozenBatchNorm2d holding the
ImageNet statistics) and ``trainable_layers=3`` (conv1 and layer1 frozen, as Detectron's
``FREEZE_AT: 2`` and torchvision's default); from scratch the default is ``norm="bn"`` (trainable
BatchNorm, what torchvision itself builds without weights; a FrozenBatchNorm2d that never saw data
is the identity, so a random network would have no normalisation at all) and ``trainable_layers=5``
(all). An explicit value is always honoured. Alternative not built: GroupNorm for from-scratch
training (He et al. 2019, "Rethinking ImageNet Pre-training").
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.image_list import ImageList
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

KINDS = ("fasterrcnn", "retinanet")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
NORMS = ("bn", "frozen_bn")
P6_SOURCES = ("c5", "p5")
#: FPN width (FPN paper §3: "we set d = 256 in all the features maps")
FPN_CHANNELS = 256

#: torchvision's documented parameter counts (``_meta["num_params"]`` of its COCO weights, 91
#: classes, FrozenBatchNorm2d so BN affine terms are buffers): key (kind, backbone, p6_from)
RESNET_FPN_PARAMS: dict[tuple[str, str, str | None], int] = {
    ("fasterrcnn", "resnet50", None): 41_755_286,   # FasterRCNN_ResNet50_FPN_Weights.COCO_V1
    ("retinanet", "resnet50", "p5"): 34_014_999,    # RetinaNet_ResNet50_FPN_Weights.COCO_V1
}


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# -- building ---------------------------------------------------------------------------------
def _read_state_dict(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (``.pt``/``.pth`` state_dict or checkpoint,
    ``.safetensors``) or of a finished run folder's exported network 0 (e.g. a zoo or ``tv:``
    ResNet classifier trained by dcmkd), read without running code by the project's one reader
    (:func:`dcmkd.models.ecosystem.read_state_dict`)."""
    from dcmkd.models.ecosystem import read_state_dict

    state = read_state_dict(source)
    if not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{source}: expected a state_dict (parameter name -> tensor), "
                         "found other values")
    return state


def _is_zoo(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("stem.") for k in sd) and any(k.startswith("stages.") for k in sd)


def zoo_to_torchvision(sd: Mapping[str, torch.Tensor], resnet: nn.Module, source: str = "weights"
                       ) -> dict[str, torch.Tensor]:
    """A dcmkd zoo ImageNet ResNet ``state_dict`` (``stem.0.weight``, ``stages.conv2_x.0.conv1
    .weight``, ``…shortcut.0.weight``; :mod:`dcmkd.models.resnet_imagenet`) renamed to
    torchvision's keys for ``resnet``. The two share one architecture (7×7/2 stem with max-pool,
    projection shortcuts conv1×1+BN, bottleneck stride on the 3×3 conv, as torchvision's "v1.5")
    and register their tensors in the same order, so keys are paired in order, the classifier
    (``head.*`` / ``fc.*``) left out; every pair must agree in shape and in its last name part."""
    def kept(items: Any, head: str) -> list[tuple[str, torch.Tensor]]:
        # BN counters are left out: FrozenBatchNorm2d has none
        return [(k, v) for k, v in items if not k.startswith(head)
                and not k.endswith("num_batches_tracked")]

    zoo, tv = kept(sd.items(), "head."), kept(resnet.state_dict().items(), "fc.")
    if len(zoo) != len(tv):
        raise ValueError(f"{source}: a zoo ResNet with {len(zoo)} backbone tensors, "
                         f"but {type(resnet).__name__} here has {len(tv)} (another depth?)")
    out = {}
    for (zk, zv), (tk, tv_) in zip(zoo, tv):
        if zk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1] or zv.shape != tv_.shape:
            raise ValueError(f"{source}: zoo key {zk} {tuple(zv.shape)} does not match "
                             f"torchvision {tk} {tuple(tv_.shape)}")
        out[tk] = zv
    return out


def load_backbone_weights(resnet: nn.Module, weights: str | Path | Mapping[str, torch.Tensor]
                          ) -> None:
    """Load an ImageNet ResNet ``state_dict`` into ``resnet``: a local file, a finished run
    folder (its exported network 0: :func:`_read_state_dict`) or an in-memory mapping, in
    torchvision's key format (``conv1.weight``, ``layer1.0.bn1.running_mean``, …) or
    a dcmkd zoo ResNet's (:func:`zoo_to_torchvision`). The classifier ``fc.*`` is ignored (absent
    or of any size). Raises one-line errors naming the file and the first missing, unexpected or
    mis-shaped keys."""
    if isinstance(weights, Mapping):
        path, sd = "backbone weights", dict(weights)
    else:
        path, sd = str(weights), _read_state_dict(weights)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if _is_zoo(sd):
        sd = zoo_to_torchvision(sd, resnet, str(path))

    def keep(k: str) -> bool:
        return not k.startswith("fc.") and not k.endswith("num_batches_tracked")

    own = {k: v for k, v in resnet.state_dict().items() if keep(k)}
    given = {k: v for k, v in sd.items() if keep(k)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in given and given[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} {items[:3]}" + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", shapes)) if items]
        raise ValueError(f"{path}: not a {type(resnet).__name__} state_dict for this backbone: "
                         + "; ".join(parts))
    resnet.load_state_dict(given, strict=False)


def detector_keywords(kind: str) -> list[str]:
    """The keywords torchvision's detector of ``kind`` takes beside the backbone, the classes
    and the sizes (its own and its image transform's); it would pass an unknown one on to the
    transform, which ignores it silently."""
    import inspect

    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    cls = FasterRCNN if kind == "fasterrcnn" else RetinaNet
    taken = {"self", "backbone", "num_classes", "min_size", "max_size", "kwargs"}
    names = [*inspect.signature(cls.__init__).parameters,
             *inspect.signature(GeneralizedRCNNTransform.__init__).parameters]
    return sorted(set(names) - taken)


def check_detector_options(kind: str, options: Mapping[str, Any]) -> None:
    """A ValueError naming a keyword of ``options`` that the detector does not take (a typo
    would otherwise be ignored: :func:`detector_keywords`)."""
    known = detector_keywords(kind)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ValueError(f"unknown {kind} option '{unknown[0]}' (torchvision's keywords: "
                         f"{', '.join(known)}; and trainable_layers, norm"
                         + (", p6_from" if kind == "retinanet" else "") + ")")


def build_detector(kind: str, backbone: str, num_classes: int, *, min_size: int = 800,
                   max_size: int = 1333,
                   backbone_weights: str | Path | Mapping[str, torch.Tensor] | None = None,
                   trainable_layers: int | None = None, norm: str | None = None,
                   p6_from: str | None = None, **detector_options: Any) -> nn.Module:
    """A torchvision Faster R-CNN+FPN (``kind="fasterrcnn"``) or RetinaNet (``"retinanet"``) with
    a ResNet-18/34/50/101/152 + FPN backbone, never downloading anything.

    ``num_classes`` counts the background (labels 1..K, ``num_classes = K + 1``; module note).
    ``backbone_weights``: an ImageNet ResNet state_dict, a local file (``.pt``/``.pth`` via
    ``torch.load(weights_only=True)``, or ``.safetensors``), a finished run folder of a ResNet
    classifier (its exported network 0) or a mapping, with torchvision's or the dcmkd zoo's
    keys (:func:`load_backbone_weights`). ``norm`` (``"bn"``/``"frozen_bn"``) and
    ``trainable_layers`` (0–5, counted from layer4 as torchvision) default to Detectron's
    practice with weights and to a fully trainable BN network without (module note).
    ``p6_from`` (RetinaNet only): ``"c5"`` (paper, default) or ``"p5"`` (torchvision v1).
    ``detector_options`` go to torchvision's ``FasterRCNN``/``RetinaNet`` (e.g.
    ``box_detections_per_img``, ``score_thresh``). The result carries ``dcmkd_spec``.
    """
    _choice("detector kind", kind, KINDS)
    _choice("detector backbone", backbone, BACKBONES)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be an int >= 2, "
                         f"got {num_classes!r}")
    pretrained = backbone_weights is not None
    norm = norm if norm is not None else ("frozen_bn" if pretrained else "bn")
    _choice("norm", norm, NORMS)
    if trainable_layers is None:
        trainable_layers = 3 if pretrained else 5
    if not (isinstance(trainable_layers, int) and 0 <= trainable_layers <= 5):
        raise ValueError(f"trainable_layers must be an int in 0..5, got {trainable_layers!r}")
    if kind == "fasterrcnn" and p6_from is not None:
        raise ValueError("p6_from applies to retinanet only (Faster R-CNN's P6 max-pools P5)")
    if kind == "retinanet":
        p6_from = p6_from if p6_from is not None else "c5"
        _choice("p6_from", p6_from, P6_SOURCES)
    for key in ("min_size", "max_size"):
        value = locals()[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    check_detector_options(kind, detector_options)

    norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
    resnet = getattr(tv_resnet, backbone)(weights=None, norm_layer=norm_layer)
    if pretrained:
        load_backbone_weights(resnet, backbone_weights)
    if kind == "fasterrcnn":
        body = _resnet_fpn_extractor(resnet, trainable_layers)  # C2-C5, LastLevelMaxPool
        model: nn.Module = FasterRCNN(body, num_classes=num_classes, min_size=min_size,
                                      max_size=max_size, **detector_options)
    else:
        c5 = resnet.inplanes  # after construction: layer4's output width
        extra = LastLevelP6P7(c5 if p6_from == "c5" else FPN_CHANNELS, FPN_CHANNELS)
        body = _resnet_fpn_extractor(resnet, trainable_layers, returned_layers=[2, 3, 4],
                                     extra_blocks=extra)
        model = RetinaNet(body, num_classes=num_classes, min_size=min_size, max_size=max_size,
                          **detector_options)
    model.dcmkd_spec = {"kind": kind, "backbone": backbone, "num_classes": num_classes,
                        "min_size": min_size, "max_size": max_size, "norm": norm,
                        "trainable_layers": trainable_layers, "p6_from": p6_from,
                        "pretrained": pretrained,
                        "backbone_weights": (None if not pretrained else "<state_dict>"
                                             if isinstance(backbone_weights, Mapping)
                                             else str(backbone_weights))}
    return model


# -- reading a detector -----------------------------------------------------------------------
def detector_kind(detector: nn.Module) -> str:
    """``"fasterrcnn"`` or ``"retinanet"`` (from ``dcmkd_spec`` or the class)."""
    spec = getattr(detector, "dcmkd_spec", None)
    if isinstance(spec, dict) and spec.get("kind") in KINDS:
        return spec["kind"]
    if isinstance(detector, RetinaNet):
        return "retinanet"
    if isinstance(detector, FasterRCNN):
        return "fasterrcnn"
    raise ValueError(f"expected a torchvision FasterRCNN or RetinaNet, "
                     f"got {type(detector).__name__}")


def _fpn_backbone(detector: nn.Module) -> BackboneWithFPN:
    bb = getattr(detector, "backbone", None)
    if not isinstance(bb, BackboneWithFPN):
        raise ValueError(f"{type(detector).__name__}.backbone must be a torchvision "
                         f"BackboneWithFPN (.body, .fpn), got {type(bb).__name__}")
    return bb


def pyramid_levels(detector: nn.Module) -> list[str]:
    """The pyramid's level names in order, as ``detector.backbone(x)`` returns them."""
    bb = _fpn_backbone(detector)
    names = list(bb.body.return_layers.values())
    extra = bb.fpn.extra_blocks
    if extra is None:
        return names
    if type(extra) is LastLevelMaxPool:
        return names + ["pool"]
    if type(extra) is LastLevelP6P7:
        return names + ["p6", "p7"]
    meta = copy.deepcopy(bb).to("meta")  # an unknown extra block: ask it
    with torch.no_grad():
        return list(meta(torch.empty(1, 3, 64, 64, device="meta")).keys())


def head_modules(detector: nn.Module) -> list[nn.Module]:
    """The task-head: every child of the detector but its ``backbone`` and ``transform``
    (Faster R-CNN: ``rpn``, ``roi_heads``; RetinaNet: ``anchor_generator`` (no parameters) and
    ``head``, the classification and regression subnets), as the paper's "Object Detection"."""
    _fpn_backbone(detector)
    return [m for n, m in detector.named_children() if n not in ("backbone", "transform")]


def model_size(detector: nn.Module) -> dict[str, int]:
    """Parameter counts (``nn.Parameter`` elements; FrozenBatchNorm2d statistics are buffers and
    not counted, as in torchvision's figures): body (ResNet), fpn, backbone = body + fpn, head,
    total."""
    def count(mods: Sequence[nn.Module]) -> int:
        seen = {id(p): p for m in mods for p in m.parameters()}
        return sum(p.numel() for p in seen.values())

    bb = _fpn_backbone(detector)
    out = {"body": count([bb.body]), "fpn": count([bb.fpn])}
    out["backbone"] = count([bb])
    out["head"] = count(head_modules(detector))
    out["total"] = count([detector])
    return out


# -- freezing the backbone (the head phase) ---------------------------------------------------
class freeze_backbone(AbstractContextManager):
    """Fix the detector's backbone (ResNet body + FPN) for the task-head phase (paper Eq. 4:
    "when training either part of {Θ_{S_B}, Θ_{S_H}}, the other part is fixed"), BatchNorm
    statistics included.

    Effective from the call: parameters get ``requires_grad=False`` and a forward pre-hook puts
    the backbone in eval mode before every forward, so a later ``detector.train()`` cannot
    switch its BatchNorm back to batch statistics. :meth:`restore` (or leaving the ``with``
    block) gives back each parameter's ``requires_grad`` and the training flags as they were.
    """

    def __init__(self, detector: nn.Module):
        self.backbone = _fpn_backbone(detector)
        self._grad = [(p, p.requires_grad) for p in self.backbone.parameters()]
        self._modes = [(m, m.training) for m in self.backbone.modules()]
        for p, _ in self._grad:
            p.requires_grad_(False)
        self.backbone.eval()
        self._hook = self.backbone.register_forward_pre_hook(lambda m, args: m.eval() and None)
        self.active = True

    def restore(self) -> None:
        if not self.active:
            return
        self._hook.remove()
        for p, flag in self._grad:
            p.requires_grad_(flag)
        for m, flag in self._modes:
            m.training = flag
        self.active = False

    def __exit__(self, *exc: object) -> None:
        self.restore()


# -- SSKD stage plan --------------------------------------------------------------------------
@dataclass
class PyramidState:
    """What a ResNet stage of :class:`ResNetFPNPlan` returns: its output map ``x`` and the
    C-levels collected so far (named as the backbone's ``return_layers``), which the FPN stage
    needs all of."""

    x: torch.Tensor
    levels: "OrderedDict[str, torch.Tensor]"


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot tell the output width of {type(module).__name__}")
    return convs[-1].out_channels


class ResNetFPNPlan:
    """SSKD stages of a torchvision ResNet-FPN detector backbone (the ``StagePlan`` protocol of
    :mod:`dcmkd.methods.stages`).

    **Reading** (the issue leaves it open; the paper says only "feature pyramid network is treated
    as the backbone" and, for classification, "we treat each resolution down-sampling layer as a
    breakpoint"): stages ``conv1+layer1``, ``layer2``, ``layer3``, ``layer4`` are the ResNet
    stages C2–C5 (the stem joins layer1 as in the classification partition), each compared as one
    map (an adapter where widths differ is the method's business); the last stage ``fpn`` is the
    whole FPN (laterals, top-down path, output convs and the extra P6/P7 levels), compared level by
    level (``feature`` returns the pyramid dict). A ResNet stage returns a :class:`PyramidState`
    (its map plus the C-levels collected so far); the FPN stage returns the pyramid dict.
    ``run(x)`` reproduces ``detector.backbone(x)`` exactly.

    Alternative not built: each ResNet stage together with "its" FPN level. FPN's top-down path
    makes every P-level depend on C5, so P_k cannot be computed at stage k; the only per-stage
    FPN pieces are the lateral 1×1 convolutions, which would still leave the top-down path and the
    output convolutions to a last stage.

    ``modules(i)`` are the detector's own modules (no copies); ResNet layers that
    ``trainable_layers`` froze keep ``requires_grad=False`` until the caller changes it.
    """

    def __init__(self, detector: nn.Module):
        bb = _fpn_backbone(detector)
        self.detector, self.body, self.fpn = detector, bb.body, bb.fpn
        self.return_layers: dict[str, str] = dict(bb.body.return_layers)
        groups: list[list[tuple[str, nn.Module]]] = [[]]
        for name, module in bb.body.named_children():
            groups[-1].append((name, module))
            if name.startswith("layer"):
                groups.append([])
        if groups[-1]:
            if len(groups) == 1:
                raise ValueError(f"{type(detector).__name__}.backbone.body has no ResNet 'layerN' "
                                 f"children: {[n for n, _ in groups[0]]}")
            groups[-2].extend(groups.pop())  # trailing parameter-free modules join the last
        else:
            groups.pop()
        self._groups = groups
        names = [g[-1][0] if len(g) == 1 else f"{g[0][0]}+{g[-1][0]}" for g in groups]
        self.names: list[str] = names + ["fpn"]
        self.channels: list[int] = [_out_channels(g[-1][1]) for g in groups] + [bb.out_channels]
        self.level_names: list[str] = pyramid_levels(detector)

    @property
    def fpn_stage(self) -> int:
        return len(self._groups)

    def __len__(self) -> int:
        return len(self._groups) + 1

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self):
            raise IndexError(f"stage index {i} out of range 0..{len(self) - 1}")

    def modules(self, i: int) -> list[nn.Module]:
        """The detector's own modules of stage ``i`` (0-based)."""
        self._check(i)
        return [self.fpn] if i == self.fpn_stage else [m for _, m in self._groups[i]]

    def parameters(self, i: int) -> list[nn.Parameter]:
        return [p for m in self.modules(i) for p in m.parameters()]

    def run_stage(self, i: int, x: Any) -> Any:
        """Stage ``i`` on ``x``: the image batch (a tensor or an ``ImageList``) for ``i = 0``,
        else what ``run_stage(i - 1)`` returned."""
        self._check(i)
        if i == 0:
            if isinstance(x, ImageList):
                x = x.tensors
            if not torch.is_tensor(x):
                raise TypeError(f"stage 0 takes the image batch tensor, got {type(x).__name__}")
            x = PyramidState(x, OrderedDict())
        elif not isinstance(x, PyramidState):
            raise TypeError(f"stage {i} ('{self.names[i]}') takes the PyramidState that stage "
                            f"{i - 1} returned, got {type(x).__name__}")
        if i == self.fpn_stage:
            return self.fpn(x.levels)
        h, levels = x.x, OrderedDict(x.levels)
        for name, module in self._groups[i]:
            h = module(h)
            if name in self.return_layers:
                levels[self.return_layers[name]] = h
        return PyramidState(h, levels)

    def run(self, x: Any, stop: int | None = None, start: int = 0) -> list[Any]:
        """Outputs of stages ``start .. stop - 1`` (default: all) from ``x``, the input of stage
        ``start``."""
        outs = []
        for i in range(start, len(self) if stop is None else stop):
            x = self.run_stage(i, x)
            outs.append(x)
        return outs

    def feature(self, i: int, out: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """What SSKD compares at stage ``i``: the stage's map, or the pyramid dict (level name ->
        map) for the ``fpn`` stage."""
        self._check(i)
        if i == self.fpn_stage:
            return out
        return out.x

    @property
    def map_stages(self) -> list[int]:
        """The stages whose feature is one map: the ResNet stages C2–C5 (every stage but the
        ``fpn``), which AT and NST compare (:mod:`dcmkd.methods.feature_kd`)."""
        return list(range(self.fpn_stage))

    def output_module(self, i: int) -> nn.Module:
        """The detector's own module whose output is stage ``i``'s :meth:`feature` (the stage's
        last ResNet layer, or the FPN)."""
        self._check(i)
        return self.fpn if i == self.fpn_stage else self._groups[i][-1][1]

    def record(self, stages: Sequence[int]) -> "StageRecorder":
        """A context in which the detector's own forward records the :meth:`feature` of each of
        ``stages`` and the backbone's input batch (:class:`StageRecorder`)."""
        return StageRecorder(self, stages)

    def describe(self) -> list[dict]:
        return [{"name": n, "channels": c,
                 "modules": ["fpn"] if i == self.fpn_stage else [m for m, _ in self._groups[i]]}
                for i, (n, c) in enumerate(zip(self.names, self.channels))]

    def __repr__(self) -> str:
        spec = getattr(self.detector, "dcmkd_spec", {})
        kind = spec.get("kind", type(self.detector).__name__)
        what = f"{kind} {spec.get('backbone', '')}".strip()
        return f"ResNetFPNPlan({what}: {', '.join(self.names)}; levels {self.level_names})"


class StageRecorder(AbstractContextManager):
    """Record, while the detector runs its own forward (its training losses), what a
    :class:`ResNetFPNPlan` would give: ``features[i]`` equals ``plan.feature(i, plan.run(x)[i])``
    for each requested stage ``i``, and ``input`` is ``x``, the normalised, resized, padded
    batch the backbone received (the input of stage 1, for a teacher's plan). Forward hooks on
    the plan's :meth:`~ResNetFPNPlan.output_module` s and a pre-hook on the backbone, removed on
    exit; the student's stages are not run a second time. One forward per ``with`` block."""

    def __init__(self, plan: ResNetFPNPlan, stages: Sequence[int]):
        self.plan, self.stages = plan, sorted(set(int(i) for i in stages))
        self.features: dict[int, Any] = {}
        self.input: torch.Tensor | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> "StageRecorder":
        def keep_input(module: nn.Module, args: tuple) -> None:
            if self.input is not None:
                raise RuntimeError("StageRecorder: the backbone ran twice in one recording")
            self.input = args[0]

        def keep(i: int) -> Any:
            def hook(module: nn.Module, args: tuple, out: Any) -> None:
                self.features[i] = out
            return hook

        self._hooks = [_fpn_backbone(self.plan.detector).register_forward_pre_hook(keep_input)]
        self._hooks += [self.plan.output_module(i).register_forward_hook(keep(i))
                        for i in self.stages]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if exc[0] is None and (self.input is None or set(self.features) != set(self.stages)):
            raise RuntimeError("StageRecorder: the detector's forward did not run its backbone "
                               f"through stages {self.stages} ({sorted(self.features)} seen)")


# -- anchors ----------------------------------------------------------------------------------
def anchor_generator(detector: nn.Module) -> nn.Module:
    """The detector's own anchor generator: its RPN's (Faster R-CNN) or its own (RetinaNet)."""
    kind = detector_kind(detector)
    return detector.rpn.anchor_generator if kind == "fasterrcnn" else detector.anchor_generator


def level_anchors(detector: nn.Module, images: torch.Tensor,
                  pyramid: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The anchors of each pyramid level as the detector itself places them: level name ->
    float32 ``(H, W, A, 4)`` boxes ``(x1, y1, x2, y2)`` (A anchors at each of the level's
    ``H×W`` locations), in the coordinates of ``images``, the transformed (resized, padded)
    batch the backbone sees. The detector's :func:`anchor_generator` computes them (its strides:
    the batch's size over the level's, as in its forward); only the levels' sizes are read from
    ``pyramid``. The generator must have one size set per level."""
    generator = anchor_generator(detector)
    counts = generator.num_anchors_per_location()
    if len(counts) != len(pyramid):
        raise ValueError(f"the detector's anchor generator has {len(counts)} levels, the "
                         f"pyramid {len(pyramid)} ({list(pyramid)})")
    shapes = [tuple(v.shape[-2:]) for v in pyramid.values()]
    grids = [images.new_empty((0, *hw), dtype=torch.float32) for hw in shapes]
    flat = generator(ImageList(images[:1], [tuple(images.shape[-2:])]), grids)[0]
    out, start = {}, 0
    for name, (h, w), a in zip(pyramid, shapes, counts):
        out[name] = flat[start:start + h * w * a].view(h, w, a, 4)
        start += h * w * a
    return out


# -- teacher/student compatibility and shared preprocessing -----------------------------------
def _transform_settings(detector: nn.Module) -> dict[str, Any]:
    t = detector.transform
    return {"min_size": tuple(t.min_size), "max_size": t.max_size,
            "image_mean": [float(v) for v in t.image_mean],
            "image_std": [float(v) for v in t.image_std],
            "size_divisible": t.size_divisible, "fixed_size": t.fixed_size}


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise a one-line ValueError unless ``teacher`` and ``student`` can be distilled stage by
    stage on the same preprocessed batch: the same detector kind, the same transform (sizes,
    normalisation, padding), the same FPN width and pyramid level names."""
    tk, sk = detector_kind(teacher), detector_kind(student)
    if tk != sk:
        raise ValueError(f"teacher kind '{tk}' vs student '{sk}'")
    ts, ss = _transform_settings(teacher), _transform_settings(student)
    for key in ts:
        if ts[key] != ss[key]:
            raise ValueError(f"teacher transform {key} {ts[key]} vs student {ss[key]}")
    tc, sc = _fpn_backbone(teacher).out_channels, _fpn_backbone(student).out_channels
    if tc != sc:
        raise ValueError(f"teacher FPN out_channels {tc} vs student {sc}")
    tl, sl = pyramid_levels(teacher), pyramid_levels(student)
    if tl != sl:
        raise ValueError(f"teacher pyramid levels {tl} vs student {sl}")


def preprocess(detector: nn.Module, images: Sequence[torch.Tensor] | torch.Tensor,
               targets: list[dict[str, torch.Tensor]] | None = None
               ) -> tuple[ImageList, list[dict[str, torch.Tensor]] | None]:
    """The detector's own ``GeneralizedRCNNTransform`` (normalise, resize, pad to a batch) on
    ``images`` (a list of ``[3, H, W]`` tensors in 0–1, or an ``[N, 3, H, W]`` batch), with the
    boxes of ``targets`` rescaled alike; returns ``(image_list, targets)`` so teacher and student
    plans run on the same tensor ``image_list.tensors``. In train mode the transform picks a random
    ``min_size`` when it holds several, as the detector's own forward does."""
    if torch.is_tensor(images):
        if images.dim() != 4:
            raise ValueError(f"images: expected [N, 3, H, W], got shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    images = list(images)
    for k, im in enumerate(images):
        if not torch.is_tensor(im) or im.dim() != 3 or im.shape[0] != 3:
            shape = tuple(im.shape) if torch.is_tensor(im) else type(im).__name__
            raise ValueError(f"image {k}: expected a [3, H, W] tensor, got {shape}")
    if targets is not None and len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    return detector.transform(images, targets)  # it copies the targets before rescaling


__all__ = ["KINDS", "BACKBONES", "NORMS", "P6_SOURCES", "FPN_CHANNELS", "RESNET_FPN_PARAMS",
           "build_detector", "load_backbone_weights", "zoo_to_torchvision", "detector_kind",
           "pyramid_levels",
           "head_modules", "model_size", "freeze_backbone", "PyramidState", "ResNetFPNPlan",
           "StageRecorder", "anchor_generator", "level_anchors",
           "check_compatible", "preprocess"]
