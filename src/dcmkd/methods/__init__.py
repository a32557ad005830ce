"""Methods: systems that own networks and say how they learn (see :mod:`dcmkd.methods.mutual`).

``create_method(name, nets, num_classes, ...)`` builds any of:

========  ==========================  ===============  =================================
name      auxiliary classifiers       links            notes
========  ==========================  ===============  =================================
ind       no                          none             each network alone (any N ≥ 1)
ds        yes (CE only)               none             deep supervision (any N ≥ 1)
kd        no                          C1 → C1, one way first network is the frozen teacher
dml       no                          C1 ↔ C1          N ≥ 2; ``update="alternating"``
dml_ds    yes                         C1 ↔ C1          DML + DS (paper Table 5)
dcm1      yes                         Ci ↔ Ci          same-staged only (Eq. 8)
dcm2      yes                         Ci ↔ Cj, i ≠ j   different-staged only (Eq. 9)
dcm       yes                         all              DCM (Eq. 6)
========  ==========================  ===============  =================================
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from dcmkd.heads import MultiExitNetwork, build_multi_exit
from dcmkd.heads.builder import parse_classifiers
from dcmkd.heads.wrap import wrap_model
from dcmkd.methods.base import Method, StepOutput
from dcmkd.methods.builders import FEATURE_OPTIONS, SSKD_OPTIONS, build_stage_method
from dcmkd.methods.mutual import UPDATE_MODES, LossOptions, MutualMethod, bn_stats_frozen
from dcmkd.methods.optimization import Schedule, SGDSettings
from dcmkd.methods.teacher import load_pretrained
from dcmkd.models import create_model
from dcmkd.models.base import Backbone
from dcmkd.registry import Registry, UnknownNameError
from dcmkd.weights import load_backbone_weights


@dataclass(frozen=True)
class MethodPreset:
    name: str
    aux: bool
    pattern: str
    min_networks: int
    frozen_teacher: bool = False
    max_networks: int | None = None
    term_names: tuple[tuple[str, str], ...] = ()
    summary: str = ""
    stage: bool = False   # a stage-wise feature method (dcmkd.methods.builders)


METHODS: Registry[MethodPreset] = Registry("method")
for _p in (
    MethodPreset("ind", False, "none", 1, summary="independent training"),
    MethodPreset("ds", True, "none", 1, summary="deep supervision"),
    # exactly teacher + student: with more students, "final" links would also couple the
    # students to each other (DML among them), which is not KD
    MethodPreset("kd", False, "final", 2, frozen_teacher=True, max_networks=2,
                 term_names=(("dcm1", "kd"),),
                 summary="knowledge distillation from a frozen teacher (first network)"),
    MethodPreset("dml", False, "final", 2, term_names=(("dcm1", "dml"),),
                 summary="deep mutual learning"),
    MethodPreset("dml_ds", True, "final", 2, term_names=(("dcm1", "dml"),),
                 summary="DML + deep supervision"),
    MethodPreset("dcm1", True, "same", 2, summary="DCM, same-staged links only"),
    MethodPreset("dcm2", True, "cross", 2, summary="DCM, different-staged links only"),
    MethodPreset("dcm", True, "dense", 2, summary="dense cross-layer mutual distillation"),
    # the stage-wise feature methods: built by dcmkd.methods.builders, options in the config's
    # sskd / feature sections; the first network is the frozen, trained teacher
    MethodPreset("sskd", False, "stage", 2, True, 2, stage=True,
                 summary="stage-by-stage KD: stage-wise feature mimicking, then the task head"),
    MethodPreset("fitnets", False, "stage", 2, True, 2, stage=True,
                 summary="FitNets hints: CE + λ·MSE(regressed student map, teacher map)"),
    MethodPreset("at", False, "stage", 2, True, 2, stage=True,
                 summary="attention transfer on the 4 stage outputs: CE + λ·AT"),
    MethodPreset("nst", False, "stage", 2, True, 2, stage=True,
                 summary="neuron selectivity transfer on the 4 stage outputs: CE + λ·MMD²"),
    MethodPreset("fixed_backbone", False, "stage", 1, True, 1, stage=True,
                 summary="re-initialised head trained alone on a frozen trained backbone"),
):
    METHODS.register(_p.name)(_p)


def stage_methods() -> list[str]:
    """The stage-wise feature methods of :data:`METHODS`."""
    return [m for m in METHODS if METHODS.get(m).stage]


def needs_teacher(name: str) -> bool:
    """Whether method ``name`` distils from (or, fixed_backbone, re-heads) a pre-trained first
    network."""
    return name in METHODS and METHODS.get(name).frozen_teacher


def create_method(name: str, nets: Sequence[str | nn.Module], num_classes: int | None = None,
                  *, classifiers: str | Sequence[str] | None = None, kind: str = "default",
                  model_options: Sequence[dict[str, Any]] | dict[str, Any] | None = None,
                  teacher_weights: str | os.PathLike | None = None,
                  teacher_net: int | None = None,
                  sskd: dict[str, Any] | None = None, feature: dict[str, Any] | None = None,
                  **loss_options: Any) -> Method:
    """Build a method from zoo names or modules.

    ``nets``: model names, ``Backbone`` s, ready ``MultiExitNetwork`` s (used as given, e.g.
    from :func:`~dcmkd.heads.wrap.wrap_model`) or any other classifier ``nn.Module`` (wrapped
    with ``wrap_model``; its ``model_options`` are ``wrap_model``'s, e.g. ``sample_input``).
    ``classifiers`` / ``kind``: the auxiliary classifiers of methods that have them (paper Tables
    3 and 4). ``model_options``: one dict for all networks or one per network (e.g. dropout).
    ``teacher_weights``: for ``kd``, a weights file for the first network (exported model or run
    checkpoint, loaded with ``weights_only=True``). ``loss_options``: the fields of
    :class:`~dcmkd.methods.mutual.LossOptions` (``alpha``, ``beta``, ``gamma``, ``temperature``,
    …).

    Stage-wise feature methods (``sskd``, ``fitnets``, ``at``, ``nst``, ``fixed_backbone``:
    :mod:`dcmkd.methods.builders`) take the same networks (without auxiliary classifiers) and
    their options in ``sskd`` / ``feature`` (:data:`SSKD_OPTIONS`, :data:`FEATURE_OPTIONS`);
    ``teacher_weights`` may be a file or a run folder for every method, and ``teacher_net``
    picks a network of that run.
    """
    preset = METHODS.get(name)
    chosen = parse_classifiers(classifiers)   # an unknown classifier is an error for any method
    if not (name in METHODS and METHODS.get(name).aux) and \
            ((classifiers is not None and chosen) or kind != "default"):
        given = f"classifiers={classifiers!r}" if classifiers is not None and chosen \
            else f"kind={kind!r}"
        with_aux = ", ".join(m for m in METHODS.names() if METHODS.get(m).aux)
        raise ValueError(f"{given}: method '{name}' trains no auxiliary classifier (the "
                         f"methods with them: {with_aux})")
    zoo = [n for n in nets if isinstance(n, str)]
    if num_classes is None and zoo:   # the zoo's default head fits CIFAR-100 / ImageNet only
        warnings.warn(f"create_method('{name}', {zoo[0]!r}, …) without num_classes: the zoo "
                      f"networks get their default head ({_default_classes(zoo[0])} classes); "
                      "pass num_classes= the class count of your data", stacklevel=2)
    if preset.stage:
        if len(nets) != preset.min_networks:
            raise ValueError(f"method '{name}' needs {preset.min_networks} "
                             f"network{'s' * (preset.min_networks > 1)} ("
                             + ("teacher, student" if preset.min_networks == 2 else
                                "the trained network") + f"), got {len(nets)}")
        if num_classes is None and zoo:   # said once above, not again for the inner call
            default = _default_classes(zoo[0])
            num_classes = default if isinstance(default, int) else None
        networks = list(create_method("ind", nets, num_classes,
                                      model_options=model_options).networks)
        method = build_stage_method(name, networks, teacher_weights=teacher_weights,
                                    teacher_net=teacher_net, sskd=sskd, feature=feature,
                                    **loss_options)
        method.name = name
        return method
    for section, given, defaults in (("sskd", sskd, SSKD_OPTIONS),
                                     ("feature", feature, FEATURE_OPTIONS)):
        changed = [k for k, v in (given or {}).items() if defaults.get(k, object()) != v]
        if changed:
            raise ValueError(f"{section}.{changed[0]} is an option of the stage-wise methods "
                             f"({', '.join(stage_methods())}), not of '{name}'")
    options = LossOptions.from_dict(loss_options, f"option of method '{name}'")
    if preset.frozen_teacher and options.update != "simultaneous":
        raise ValueError(f"'{name}' has a single trainable network; loss.update does not apply")
    if len(nets) < preset.min_networks:
        raise ValueError(f"method '{name}' needs at least {preset.min_networks} networks, "
                         f"got {len(nets)}")
    if preset.max_networks is not None and len(nets) > preset.max_networks:
        raise ValueError(f"method '{name}' takes {preset.max_networks} networks (teacher, "
                         f"student), got {len(nets)}; train one run per student")
    if isinstance(model_options, dict) or model_options is None:
        model_options = [dict(model_options or {}) for _ in nets]
    if len(model_options) != len(nets):
        raise ValueError(f"{len(model_options)} model_options for {len(nets)} networks")
    networks: list[MultiExitNetwork] = []
    for i, (net, opts) in enumerate(zip(nets, model_options)):
        if isinstance(net, MultiExitNetwork):
            networks.append(net)
            continue
        is_teacher = preset.frozen_teacher and i == 0
        aux = preset.aux and not is_teacher
        if isinstance(net, str):
            net = build_multi_exit(net, num_classes, classifiers=classifiers if aux else "C1",
                                   kind=kind, **opts)
        elif isinstance(net, Backbone):
            if opts:
                raise ValueError(f"network {i}: model_options go with a model name, not a "
                                 f"built {type(net).__name__}")
            net = build_multi_exit(net, classifiers=classifiers if aux else "C1", kind=kind)
        elif isinstance(net, nn.Module):  # the user's own classifier (options: of wrap_model)
            net = wrap_model(net, num_classes, classifiers=classifiers if aux else "C1",
                             kind=kind, **opts)
        else:
            raise TypeError(f"network {i}: expected a model name or an nn.Module, "
                            f"got {type(net).__name__}")
        networks.append(net)
    if teacher_weights is not None:
        if not preset.frozen_teacher:
            raise ValueError(f"teacher_weights is for 'kd', not '{name}'")
        load_pretrained(networks[0].backbone, teacher_weights, teacher_net)
    elif preset.frozen_teacher and not isinstance(nets[0], nn.Module):
        warnings.warn(f"'{name}' without teacher_weights: the teacher is untrained", stacklevel=2)
    method = MutualMethod(networks, preset.pattern, frozen=(0,) if preset.frozen_teacher else (),
                          options=options, term_names=dict(preset.term_names))
    method.name = name
    return method


def _default_classes(model: str) -> int | str:
    """The head size a zoo model gets without ``num_classes``."""
    try:
        with torch.device("meta"):
            return int(create_model(model).num_classes)
    except Exception:  # noqa: BLE001 - an unknown name is refused later, with its own message
        return "its default"


__all__ = ["METHODS", "MethodPreset", "needs_teacher", "Method", "MutualMethod", "StepOutput", "create_method",
           "bn_stats_frozen", "UPDATE_MODES", "stage_methods", "LossOptions", "SSKD_OPTIONS",
           "FEATURE_OPTIONS", "SGDSettings", "Schedule"]
