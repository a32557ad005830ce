"""Networks of timm and torchvision as zoo :class:`~dcmkd.models.base.Backbone` s.

**Names.** ``tv:<name>`` is ``torchvision.models.get_model(<name>, num_classes=K, **options)``
and ``timm:<name>`` is ``timm.create_model(<name>, num_classes=K, **options)`` (a timm name may
carry timm's own pretrained tag, ``timm:resnet18.a1_in1k``). Constructor options are the
``model_options`` of the network (``{drop_rate: 0.1}``), as for zoo networks; two are this
module's own:

- ``weights``: initial weights. For ``tv:`` a torchvision weights name (``IMAGENET1K_V1``,
  ``DEFAULT``) loaded through torchvision's own path (download or the torch hub cache); for
  both schemes a local file (a ``state_dict`` ``.pt``/``.pth``, a ``.safetensors`` file) or a
  finished dcmkd run folder (its network 0). Files are read without running code
  (``weights_only=True``; safetensors holds tensors only).
- ``pretrained`` (``timm:`` only): timm's own pretrained loading.

With another class count than the weights', the classifier keeps its fresh initialisation and a
warning says so (as ``timm.create_model(pretrained=True, num_classes=K)`` does). A download that
fails says in one line what to fetch and where to put it.

**The adapter** (:class:`LibraryBackbone`, a reading of this library): the library model's own
modules are re-grouped, without copying, into the zoo's ``stem → stages → head``:

- ``timm:``: the units end at the modules of timm's ``feature_info`` (the library's metadata for
  ``features_only``); the model's top-level children, with ``nn.Sequential`` s opened where a
  ``feature_info`` module lies inside, are the layers; those run by ``forward_features`` form
  the body (the modules after the last ``feature_info`` module join the last stage) and the rest
  the head, which runs timm's own ``forward_head``.
- ``tv:``: the known block structure of each family (:data:`TV_FAMILIES`): ResNet/ResNeXt/
  Wide ResNet, RegNet and ShuffleNetV2 by their named stages; the ``features`` families
  (MobileNetV2/V3, EfficientNet, VGG, ConvNeXt, DenseNet, MNASNet) cut before every module with
  parameters that down-samples, a parameter-free down-sampling (pooling) closing its unit.
  The head is the family's own pooling, flattening and classifier.

A derived structure is checked once at construction: the units and head, run one after another,
must reproduce the library model's output (and timm's ``forward_features``) exactly, else a
one-line error says what to use instead. The adapter's parameters keep the library's names, so
``state_dict`` s are interchangeable with the plain library model's; :meth:`LibraryBackbone.export`
gives the plain model back.

**Auxiliary classifiers** (DCM): a branch copies the network's own later stages (a freshly
initialised library model's, so no pretrained weight leaks into a branch), then global average
pooling and a linear layer. The block counts follow :func:`dcmkd.heads.tables.derived_branches`
(C3/C4 halve them, dropping blocks that keep their input's shape, latest first); widths stay the
network's own: a library block cannot be rebuilt at another width, so C2's doubled width (the
ResNet tables' pattern) is not applied and ``aux_kind: narrow`` is refused.
"""
from __future__ import annotations

import copy
import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from dcmkd.models.base import Backbone, StageInfo, StageSpec, inference, init_weights

SCHEMES = ("tv", "timm")
#: the spatial size of the (meta-device) input from which channels and strides are derived
CHECK_SIZE = 64
#: the spatial size of the one real image with which a derived structure is checked
VERIFY_SIZE = 32

Layer = tuple[str, nn.Module]   # (dotted path in the library model, module)


def is_library_name(name: str) -> bool:
    """Whether ``name`` names a timm or torchvision network (``tv:…``, ``timm:…``)."""
    return isinstance(name, str) and name.partition(":")[0] in SCHEMES and ":" in name


def split_name(name: str) -> tuple[str, str]:
    scheme, _, arch = name.partition(":")
    if scheme not in SCHEMES or not arch:
        raise ValueError(f"model '{name}': expected tv:<torchvision name> or timm:<timm name>")
    return scheme, arch


# -- the adapter ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LibraryStageSpec(StageSpec):
    """A stage of a library network: ``source`` names the unit a copy is made of."""

    source: str = ""


class LibraryHead(nn.Module):
    """A timm model's head: owns the head modules and runs the model's own ``forward_head``
    (global pooling, dropout, the classifier), with the model's ``training`` flag following the
    classifier's (the model object itself is not registered anywhere)."""

    def __init__(self, library: nn.Module, modules: Sequence[Layer]):
        super().__init__()
        self.parts = nn.ModuleList([m for _, m in modules])
        self.__dict__["_library"] = library

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        library = self.__dict__["_library"]
        probe = self.parts[-1] if len(self.parts) else self
        library.training = probe.training
        return library.forward_head(x)


class LibraryBackbone(Backbone):
    """A timm/torchvision network as a zoo :class:`Backbone` (see the module note).

    The library model's children are registered under their own names (so ``state_dict`` keys
    are the library's); ``stem``, ``stages`` and ``head`` are views onto the same modules.
    """

    input_size = 224

    def __init__(self, library: nn.Module, name: str, units: Sequence[tuple[str, list[Layer]]],
                 head: nn.Module, head_layers: Sequence[Layer], num_classes: int,
                 factory: Callable[[], nn.Module], forward_features: bool):
        nn.Module.__init__(self)
        if next(library.parameters(recurse=False), None) is not None or \
                next(library.buffers(recurse=False), None) is not None:
            raise ValueError(f"{name} holds parameters outside its sub-modules (not a "
                             "convolutional network of stages); wrap it with dcmkd.wrap_model")
        for child_name, child in library.named_children():
            self.add_module(child_name, child)
        d = self.__dict__
        d["_library"], d["_factory"], d["_has_forward_features"] = library, factory, \
            forward_features
        d["_unit_paths"] = {u: [p for p, _ in layers] for u, layers in units}
        d["_head_paths"] = [p for p, _ in head_layers]
        d["_stem"] = _sequence(units[0][1])
        d["_stages"] = nn.ModuleDict({u: _sequence(layers) for u, layers in units[1:]})
        d["_head"] = head
        self.model_name = name
        self.num_classes = num_classes
        self.block_type = f"{name.split(':')[0]} {type(library).__name__}"
        self.stage_info: list[StageInfo] = []
        self.stage_specs: dict[str, StageSpec] = {}
        self.input_size = _input_size(library)
        self._derive_shapes()

    stem = property(lambda self: _view(self, "_stem"))
    stages = property(lambda self: _view(self, "_stages"))
    head = property(lambda self: _view(self, "_head"))

    @property
    def library(self) -> nn.Module:
        """The library model itself (sharing this backbone's modules and weights)."""
        return self.__dict__["_library"]

    def _derive_shapes(self) -> None:
        """Channels and cumulative strides of the units, and their block counts, from a
        forward pass on a meta-device copy (no compute) at :data:`CHECK_SIZE`."""
        meta = copy.deepcopy(self).to("meta")
        x = torch.empty(1, 3, CHECK_SIZE, CHECK_SIZE, device="meta")
        self.__dict__["_unit_inputs"] = {}
        with inference(meta):
            for i, (name, unit) in enumerate([(self.stage_names_raw[0], meta.stem),
                                              *meta.stages.items()]):
                self.__dict__["_unit_inputs"][name] = tuple(x.shape[1:])
                x = unit(x)
                if x.dim() != 4:
                    raise ValueError(f"{self.model_name}: unit '{name}' outputs {tuple(x.shape)}, "
                                     "not a feature map [B, C, H, W]")
                stride = max(1, round(CHECK_SIZE / x.shape[-1]))
                self.stage_info.append(StageInfo(name, int(x.shape[1]), stride))
                if i:
                    prev = self.stage_info[-2].stride
                    self.stage_specs[name] = LibraryStageSpec(
                        len(_layers_of(unit)), int(x.shape[1]), max(1, stride // prev),
                        source=name)

    @property
    def stage_names_raw(self) -> list[str]:
        return list(self.__dict__["_unit_paths"])

    # -- forward: the views, in order; the head syncs timm's training flag ---------------------
    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def verify(self) -> None:
        """Check that the views reproduce the library model (see the module note): timm's
        ``forward_features`` (the head is timm's own ``forward_head``), torchvision's forward."""
        if _on_meta(self):
            return
        x = _sample(self, VERIFY_SIZE)
        lib = self.library
        with inference(self):
            lib.training = False
            if self.__dict__["_has_forward_features"]:
                ours, theirs = self.forward_features(x), lib.forward_features(x)
            else:
                ours, theirs = self(x), lib(x)
            same = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4,
                                                                 atol=1e-5)
        if not same:
            raise ValueError(f"{self.model_name}: its forward is not the sequence of its stages "
                             "that dcmkd derived, so stage-wise methods and auxiliary classifiers "
                             "cannot use it; wrap it with dcmkd.wrap_model (methods ind, ds, kd, "
                             "dml, dcm) or subclass dcmkd.models.Backbone")

    # -- building more of the same family (DCM auxiliary classifiers) -------------------------
    def make_stage(self, in_channels: int, spec: StageSpec) -> tuple[nn.Module, int]:
        """A fresh copy of unit ``spec.source`` (library init), cut to ``spec.blocks`` blocks by
        dropping shape-keeping blocks latest first; widths stay the network's own."""
        paths = self.__dict__["_unit_paths"]
        if not isinstance(spec, LibraryStageSpec) or spec.source not in paths:
            raise ValueError(f"{self.model_name}: an auxiliary stage of a library network is a "
                             "copy of one of its own stages; a branch table with other stages "
                             "does not apply")
        own = self.stage_specs[spec.source]
        if spec.width < own.width:
            raise ValueError(f"{self.model_name}: aux_kind 'narrow' needs blocks rebuilt at "
                             "another width, which a library network's blocks cannot be; use "
                             "aux_kind default or apfc")
        shape = self.__dict__["_unit_inputs"][spec.source]
        if in_channels != shape[0]:
            raise ValueError(f"{self.model_name}: stage '{spec.source}' takes {shape[0]} "
                             f"channels, not {in_channels}")
        fresh = self.__dict__["_factory"]()
        unit = copy.deepcopy(_sequence([(p, fresh.get_submodule(p)) for p in paths[spec.source]]))
        del fresh
        unit = _trim(unit, spec.blocks, shape)
        with torch.no_grad(), inference(unit):
            meta = copy.deepcopy(unit).to("meta")
            out = meta(torch.empty(1, *shape, device="meta"))
        return unit, int(out.shape[1])

    def initialize(self, module: nn.Module) -> None:
        """A new branch: its copied stages keep the library's fresh init; the head (pooling and a
        linear layer, or APFC) gets the zoo's init."""
        if isinstance(getattr(module, "stages", None), nn.Module) and \
                isinstance(getattr(module, "head", None), nn.Module):
            init_weights(module.head)
        else:
            init_weights(module)

    def export(self) -> nn.Module:
        """A copy of the plain library model with this backbone's weights."""
        plain = copy.deepcopy(self.library)
        plain.train(self.training)
        return plain

    def head_state_names(self) -> list[str]:
        """The ``state_dict`` keys of the classifier head."""
        ids = {id(t) for t in [*self.head.parameters(), *self.head.buffers()]}
        return [k for k, v in self.state_dict(keep_vars=True).items() if id(v) in ids]


def _view(backbone: LibraryBackbone, key: str) -> nn.Module:
    try:
        return backbone.__dict__[key]
    except KeyError:   # during construction (e.g. a library child named 'stem')
        raise AttributeError(key) from None


def _sequence(layers: Sequence[Layer]) -> nn.Module:
    return layers[0][1] if len(layers) == 1 else nn.Sequential(*[m for _, m in layers])


def _param_free(m: nn.Module) -> bool:
    return next(m.parameters(), None) is None


def _layers_of(unit: nn.Module) -> list[tuple[nn.Module, int, nn.Module]]:
    """The blocks of a unit: (container, index, block) of its members with parameters, members
    that are an ``nn.Sequential`` opened one level."""
    members = list(unit) if isinstance(unit, nn.Sequential) else [unit]
    owner = unit if isinstance(unit, nn.Sequential) else None
    out = []
    for i, m in enumerate(members):
        if isinstance(m, nn.Sequential) and len(m) > 1:
            out += [(m, j, b) for j, b in enumerate(m) if not _param_free(b)]
        elif not _param_free(m):
            out.append((owner, i, m))
    return out


def _trim(unit: nn.Module, blocks: int, shape: tuple[int, ...]) -> nn.Module:
    """Drop shape-keeping blocks, latest first, until ``blocks`` remain (or none can go)."""
    layers = _layers_of(unit)
    if blocks >= len(layers):
        return unit
    meta = copy.deepcopy(unit).to("meta")
    keeps: list[bool] = []
    hooks = [b.register_forward_hook(
        lambda m, a, o: keeps.append(tuple(a[0].shape) == tuple(o.shape)))
        for _, _, b in _layers_of(meta)]
    with inference(meta):
        meta(torch.empty(1, *shape, device="meta"))
    for h in hooks:
        h.remove()
    drop = [(c, i) for (c, i, _), keep in reversed(list(zip(layers, keeps)))
            if keep and c is not None][:len(layers) - blocks]
    for c, i in sorted(drop, key=lambda t: -t[1]):
        del c[i]
    return unit


def _on_meta(module: nn.Module) -> bool:
    p = next(module.parameters(), None)
    return p is not None and p.device.type == "meta"


def _sample(module: nn.Module, size: int) -> torch.Tensor:
    """A fixed random image (its own generator: the global RNG is left alone)."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "meta":
        return torch.empty(1, 3, size, size, device="meta")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x.to(p.device, p.dtype) if p is not None else x


def _input_size(library: nn.Module) -> int:
    cfg = getattr(library, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else 224


# -- timm: feature_info ---------------------------------------------------------------------
def _flatten(module: nn.Module, ends: Sequence[str], prefix: str = "") -> list[Layer]:
    out: list[Layer] = []
    for name, child in module.named_children():
        path = prefix + name
        if any(e.startswith(path + ".") for e in ends):
            if not isinstance(child, nn.Sequential):
                raise _underivable(path)
            out += _flatten(child, ends, path + ".")
        else:
            out.append((path, child))
    return out


def _underivable(where: str) -> ValueError:
    return ValueError(f"cannot derive stages: '{where}' is not a plain sequence of modules; "
                      "wrap the network with dcmkd.wrap_model (methods ind, ds, kd, dml, dcm) "
                      "or subclass dcmkd.models.Backbone to declare its stages")


def _timm_layout(lib: nn.Module, name: str) -> tuple[list[tuple[str, list[Layer]]], nn.Module,
                                                       list[Layer]]:
    info = getattr(lib, "feature_info", None)
    if not info or not all(isinstance(d, dict) and "module" in d for d in info):
        raise ValueError(f"{name}: timm declares no feature_info for it (no convolutional "
                         "stages); wrap it with dcmkd.wrap_model or use another network")
    ends = [d["module"] for d in info]
    try:
        flat = _flatten(lib, ends)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    called: list[str] = []
    meta = copy.deepcopy(lib).to("meta")   # which layers forward_features runs: shapes only
    for p, _ in flat:
        meta.get_submodule(p).register_forward_pre_hook(lambda mod, a, p=p: called.append(p))
    try:
        with inference(meta):
            meta.forward_features(torch.empty(1, 3, CHECK_SIZE, CHECK_SIZE, device="meta"))
    except (AssertionError, RuntimeError, ValueError) as e:   # e.g. a ViT's fixed input size
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{name}: its forward_features does not run on a {CHECK_SIZE}×"
                         f"{CHECK_SIZE} probe ({reason}), so its stages cannot be derived (a "
                         "fixed input size, as timm's vision transformers have); use a "
                         "convolutional network, or wrap it with dcmkd.wrap_model (methods ind, "
                         "ds, kd, dml, dcm)") from None
    if len(set(called)) != len(called):
        raise ValueError(f"{name}: {_underivable(called[0])}")
    by_path = dict(flat)
    body = [(p, by_path[p]) for p in called]
    head_layers = [(p, m) for p, m in flat if p not in set(called)]
    units: list[tuple[str, list[Layer]]] = []
    current: list[Layer] = []
    todo = list(ends)
    for p, m in body:
        current.append((p, m))
        if todo and p == todo[0]:
            units.append((p.replace(".", "_"), current))
            current, todo = [], todo[1:]
    if todo:
        raise ValueError(f"{name}: feature_info module '{todo[0]}' is not run by "
                         f"forward_features in order; {_underivable(todo[0])}")
    if current:
        units[-1] = (units[-1][0], units[-1][1] + current)
    if len(units) < 2:
        raise ValueError(f"{name}: timm's feature_info gives fewer than two stages")
    return units, LibraryHead(lib, head_layers), head_layers


# -- torchvision: the families' block structure ---------------------------------------------
_FLAT = nn.Flatten(1)
_GAP = nn.AdaptiveAvgPool2d(1)
_RELU = nn.ReLU()

#: family class name → (units as named module paths, or the container cut at down-samplings;
#: the head as module paths and parameter-free steps)
TV_FAMILIES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "ResNet": ([["conv1", "bn1", "relu", "maxpool"], ["layer1"], ["layer2"], ["layer3"],
                ["layer4"]], ("avgpool", _FLAT, "fc")),
    "RegNet": ([["stem"], ["trunk_output.block1"], ["trunk_output.block2"],
                ["trunk_output.block3"], ["trunk_output.block4"]], ("avgpool", _FLAT, "fc")),
    "ShuffleNetV2": ([["conv1", "maxpool"], ["stage2"], ["stage3"], ["stage4", "conv5"]],
                     (_GAP, _FLAT, "fc")),
    "MobileNetV2": ("features", (_GAP, _FLAT, "classifier")),
    "MobileNetV3": ("features", ("avgpool", _FLAT, "classifier")),
    "EfficientNet": ("features", ("avgpool", _FLAT, "classifier")),
    "VGG": ("features", ("avgpool", _FLAT, "classifier")),
    "ConvNeXt": ("features", ("avgpool", "classifier")),
    "DenseNet": ("features", (_RELU, _GAP, _FLAT, "classifier")),
    "MNASNet": ("layers", (_GAP, _FLAT, "classifier")),
}


def _tv_layout(lib: nn.Module, name: str) -> tuple[list[tuple[str, list[Layer]]], nn.Module,
                                                     list[Layer]]:
    family = next((c.__name__ for c in type(lib).__mro__ if c.__name__ in TV_FAMILIES), None)
    if family is None:
        raise ValueError(f"{name}: dcmkd knows the stages of torchvision's "
                         f"{', '.join(TV_FAMILIES)} families, not {type(lib).__name__}; wrap it "
                         "with dcmkd.wrap_model (methods ind, ds, kd, dml, dcm) or use timm:")
    body, head_spec = TV_FAMILIES[family]
    if isinstance(body, str):
        units = _cut_at_downsamplings(lib, [(f"{body}.{k}", m)
                                            for k, m in lib.get_submodule(body).named_children()])
    else:
        units = [(paths[-1].replace(".", "_"), [(p, lib.get_submodule(p)) for p in paths])
                 for paths in body]
    head_layers = [(s, lib.get_submodule(s)) for s in head_spec if isinstance(s, str)]
    head = nn.Sequential(*[lib.get_submodule(s) if isinstance(s, str) else copy.copy(s)
                           for s in head_spec])
    return units, head, head_layers


def _cut_at_downsamplings(lib: nn.Module, layers: list[Layer]) -> list[tuple[str, list[Layer]]]:
    """Units of a sequence of layers: a layer with parameters that down-samples starts a unit,
    a parameter-free one (a pooling) ends its unit."""
    x = torch.empty(1, 3, CHECK_SIZE, CHECK_SIZE, device="meta")
    meta = copy.deepcopy(lib).to("meta")
    units: list[list[Layer]] = [[]]
    closed = False
    with inference(meta):
        for p, m in layers:
            y = meta.get_submodule(p)(x)
            down = y.shape[-1] < x.shape[-1]
            if units[-1] and (closed or (down and not _param_free(m))):
                units.append([])
            units[-1].append((p, m))
            closed = down and _param_free(m)
            x = y
    return [(u[-1][0].replace(".", "_"), u) for u in units]


# -- construction ---------------------------------------------------------------------------
def _construct(scheme: str, arch: str, num_classes: int, options: dict[str, Any],
               name: str) -> nn.Module:
    try:
        if scheme == "timm":
            timm = _import("timm")
            if not timm.is_model(arch):
                close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
                raise ValueError(f"unknown timm model '{arch}'"
                                 + (f" (did you mean {', '.join(close)}?)" if close else "")
                                 + "; timm.list_models() lists them")
            return timm.create_model(arch, num_classes=num_classes, **options)
        models = _import("torchvision").models
        names = models.list_models()
        if arch not in names:
            close = difflib.get_close_matches(arch, names, n=3, cutoff=0.6)
            raise ValueError(f"unknown torchvision model '{arch}'"
                             + (f" (did you mean {', '.join(close)}?)" if close else "")
                             + "; torchvision.models.list_models() lists them")
        return models.get_model(arch, num_classes=num_classes, **options)
    except TypeError as e:
        raise ValueError(f"model options of {name}: {e}") from None


def _import(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"{module} is not installed: pip install 'dcmkd[vision]' (or "
                         f"pip install {module})") from None


def create_library_model(name: str, num_classes: int | None = None,
                         **options: Any) -> LibraryBackbone:
    """Build ``tv:<name>`` / ``timm:<name>`` as a :class:`LibraryBackbone` with ``num_classes``
    classes (default 1000); ``options``: the library constructor's, plus ``weights`` and (timm)
    ``pretrained`` (see the module note)."""
    scheme, arch = split_name(name)
    num_classes = int(num_classes or 1000)
    options = dict(options)
    weights = options.pop("weights", None)
    pretrained = bool(options.get("pretrained", False))
    if scheme == "tv" and "pretrained" in options:
        raise ValueError(f"model option pretrained of {name}: torchvision takes weights: "
                         "IMAGENET1K_V1 (or DEFAULT) instead")
    if weights is not None and not isinstance(weights, (str, Path)):
        raise ValueError(f"model option weights of {name}: expected a weights name or a path, "
                         f"got {weights!r}")
    fresh_options = {k: v for k, v in options.items() if k != "pretrained"}

    def factory() -> nn.Module:
        return _construct(scheme, arch, num_classes, fresh_options, name)

    if pretrained:
        try:
            lib = _construct(scheme, arch, num_classes, options, name)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a download's many failure types
            raise FileNotFoundError(_timm_download_hint(arch, e)) from None
    else:
        lib = factory()
    layout = _timm_layout if scheme == "timm" else _tv_layout
    units, head, head_layers = layout(lib, name)
    backbone = LibraryBackbone(lib, name, units, head, head_layers, num_classes, factory,
                               forward_features=scheme == "timm")
    backbone.verify()
    if weights is not None:
        load_library_weights(backbone, weights)
    return backbone


# -- weights --------------------------------------------------------------------------------
def _timm_download_hint(arch: str, error: Exception) -> str:
    why = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
    try:
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001
        cfg = None
    where = []
    if cfg is not None and getattr(cfg, "hf_hub_id", None):
        where.append(f"https://huggingface.co/{cfg.hf_hub_id} (model.safetensors)")
    if cfg is not None and getattr(cfg, "url", None):
        where.append(cfg.url)
    fetch = " or ".join(where) or "the weights file"
    return (f"cannot load timm's pretrained weights for {arch} ({why}): fetch {fetch} and give "
            "it as model option weights: PATH instead of pretrained: true")


def _tv_weights(arch: str, value: str) -> Any | None:
    """torchvision's weights entry named ``value`` for ``arch`` (None: not a weights name)."""
    models = _import("torchvision").models
    enum = models.get_model_weights(arch)
    key = value.split(".")[-1]
    return enum[key] if key in enum.__members__ else None


def _tv_state(entry: Any, name: str) -> dict[str, torch.Tensor]:
    """Load a torchvision weights entry through torchvision's own path (the hub cache, else a
    download), never running code; a failed download says what to fetch and where."""
    url = entry.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    try:
        return entry.get_state_dict(progress=False, weights_only=True)
    except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors…
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise FileNotFoundError(f"cannot download {type(entry).__name__}.{entry.name} for "
                                f"{name} ({why}): fetch {url} and put it at {cache}") from None


def read_state_dict(source: str | Path, network: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a ``state_dict`` or checkpoint ``.pt``/``.pth``, a
    ``.safetensors`` file) or of a finished run folder's network, read without running code."""
    from dcmkd.run_folder import resolve_weights
    from dcmkd.weights import load_file
    path = resolve_weights(source, network)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as load_safetensors
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the safetensors package "
                             "(pip install safetensors)") from None
        try:
            return load_safetensors(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - a damaged header
            raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    state: Any = load_file(path)
    for key in ("state_dict", "model", "method"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    for prefix in ("networks.0.", "backbone.", "module."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_library_weights(backbone: LibraryBackbone, source: str | Path | dict,
                         network: int | None = None) -> LibraryBackbone:
    """Load weights into a library backbone: a torchvision weights name (``IMAGENET1K_V1``), a
    file or run folder (:func:`read_state_dict`), or a ``state_dict``. A classifier trained for
    another class count is left at its fresh init with a warning; any other mismatch is an
    error naming the tensor."""
    name = backbone.model_name
    what = str(source) if not isinstance(source, dict) else "the state dict"
    if isinstance(source, dict):
        state = source
    else:
        scheme, arch = split_name(name)
        entry = _tv_weights(arch, str(source)) if scheme == "tv" else None
        if entry is not None:
            state, what = _tv_state(entry, name), f"{type(entry).__name__}.{entry.name}"
        elif not Path(source).exists():
            known = ""
            if scheme == "tv":
                enum = _import("torchvision").models.get_model_weights(arch)
                known = f"a torchvision weights name ({', '.join(enum.__members__)}) nor "
            raise FileNotFoundError(f"model option weights of {name}: '{source}' is neither "
                                    f"{known}a weights file or run folder")
        else:
            state = read_state_dict(source, network)
    own = backbone.state_dict()
    head = set(backbone.head_state_names())
    wrong = [k for k, v in state.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if any(k not in head for k in wrong):
        k = next(k for k in wrong if k not in head)
        raise ValueError(f"{what} does not fit {name}: {k} is {list(state[k].shape)} there but "
                         f"{list(own[k].shape)} in the model (another architecture?)")
    if wrong:
        warnings.warn(f"{what} has a classifier for another class count "
                      f"({', '.join(wrong)}): {name}'s classifier keeps its fresh init for "
                      f"{backbone.num_classes} classes", stacklevel=2)
    state = {k: v for k, v in state.items() if k not in wrong}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in wrong]
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} weights of {name}, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{what} has {len(unexpected)} weights {name} does not, e.g. "
                         f"{unexpected[:3]} (another architecture?)")
    return backbone


def unwrap(network: nn.Module) -> nn.Module:
    """The plain library model of a library backbone, or of a multi-exit network built on one
    (a copy, with the trained weights); any other network is returned as it is."""
    backbone = getattr(network, "backbone", network)
    return backbone.export() if isinstance(backbone, LibraryBackbone) else network


__all__ = ["SCHEMES", "TV_FAMILIES", "LibraryBackbone", "LibraryHead", "LibraryStageSpec",
           "is_library_name", "split_name", "create_library_model", "load_library_weights",
           "read_state_dict", "unwrap"]
