"""Builders of the stage-wise feature methods: ``sskd``, ``fitnets``, ``at``, ``nst`` and
``fixed_backbone`` (:func:`dcmkd.methods.create_method` dispatches here).

========================  ========  ===================================================
name                      networks  what is trained
========================  ========  ===================================================
sskd                      2         stage by stage, then the task head (SSKD paper)
fitnets, at, nst          2         ``CE + λ·L_feat`` (λ = ``loss.beta``), teacher frozen
fixed_backbone            1         the re-initialised head of a trained network (Table 1)
========================  ========  ===================================================

The first network is the teacher (frozen; weights from ``teacher_weights``, a file or a run
folder, network ``teacher_net`` of that run). Options come from the run config's ``sskd`` and
``feature`` sections (:data:`SSKD_OPTIONS`, :data:`FEATURE_OPTIONS`: the one list of their names
and defaults, from which :data:`dcmkd.engine.config.DEFAULTS` takes them); the loss weight λ of
FitNets/AT/NST is ``loss.beta``. The run's epochs and SGD settings reach SSKD through
``configure_optimization``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from typing import Any, Sequence

from torch import nn

from dcmkd.methods.base import Method
from dcmkd.methods.feature_kd import FEATURE_METHODS, FeatureKD
from dcmkd.methods.mutual import LossOptions
from dcmkd.methods.sskd import SSKD, FixedBackbone
from dcmkd.methods.teacher import load_pretrained
from dcmkd.registry import UnknownNameError

#: name → (number of networks, summary)
STAGE_METHODS: dict[str, tuple[int, str]] = {
    "sskd": (2, "stage-by-stage KD: stage-wise feature mimicking, then the task head"),
    "fitnets": (2, "FitNets hints: CE + λ·MSE(regressed student map, teacher map)"),
    "at": (2, "attention transfer on the 4 stage outputs: CE + λ·AT"),
    "nst": (2, "neuron selectivity transfer on the 4 stage outputs: CE + λ·MMD²"),
    "fixed_backbone": (1, "re-initialised head trained alone on a frozen trained backbone"),
}

#: the ``sskd`` config section (see :mod:`dcmkd.methods.sskd` and the README)
SSKD_OPTIONS: dict[str, Any] = {
    "stages": 4,               # 1–8 stages, or the unit names at which stages end
    "schedule": "plateau",     # plateau (lr ×factor when the distance stops decreasing) | epochs
    "lr": 0.01, "momentum": 0.9,
    "weight_decay": None,      # None: the run's optim.weight_decay
    "factor": 0.9, "patience": 0, "threshold": 0.0, "min_lr": 1.0e-5,   # plateau
    "stage_epochs": None,      # epochs per stage (epochs mode) or at most (plateau); None: epochs
    "milestones": [0.3, 0.6, 0.9], "gamma": 0.1,   # epochs mode (≤ 1: fractions of stage_epochs)
    "multi_loss": False,       # Table 2: all stage losses summed, trained at once
    "head": "separate",        # separate (backbone frozen) | end_to_end (fine-tune everything)
    "head_epochs": None,       # task-head phase length; None: epochs; 0: none
    "adapter": "auto",         # auto (1×1 conv when channels differ) | always
}

#: the ``feature`` config section (FitNets / AT / NST)
FEATURE_OPTIONS: dict[str, Any] = {
    "stages": 4,               # stage outputs compared by AT and NST
    "hint": "auto",            # FitNets: auto (the stage ending at conv3_x, else the 2nd) |
                               # 1-based stage of that partition | a unit name
    "reduction": "sum",        # AT/NST over stages: sum (the originals') | mean
    "p": 2.0,                  # AT exponent
    "degree": 2, "c": 0.0,     # NST polynomial kernel
}

#: the logit methods' loss options these methods use (λ = ``beta``; the others must keep their
#: defaults)
USED_LOSS_OPTIONS = ("beta", "label_smoothing")


def _options(defaults: dict[str, Any], given: dict[str, Any] | None, what: str) -> dict[str, Any]:
    out = dict(defaults)
    for k, v in (given or {}).items():
        if k not in defaults:
            raise UnknownNameError(f"{what} option", k, defaults)
        out[k] = v
    return out


def _check_loss_options(name: str, loss_options: dict[str, Any]) -> dict[str, Any]:
    defaults = asdict(LossOptions())
    used = {}
    for k, v in loss_options.items():
        if k not in defaults:
            raise UnknownNameError(f"option of method '{name}'", k, LossOptions.names())
        if k == "beta" and name not in FEATURE_METHODS:
            if v != defaults[k]:
                raise ValueError(f"loss.beta does not apply to '{name}' (it has no loss weight)")
        elif k in USED_LOSS_OPTIONS:
            used[k] = v
        elif k == "rampup" and v == "auto":   # the config default: no distillation weight to ramp
            continue
        elif v != defaults[k]:
            raise ValueError(f"loss.{k} does not apply to '{name}'")
    return used


def build_stage_method(name: str, networks: Sequence[nn.Module], *,
                       teacher_weights: str | os.PathLike | None = None,
                       teacher_net: int | None = None,
                       sskd: dict[str, Any] | None = None,
                       feature: dict[str, Any] | None = None,
                       **loss_options: Any) -> Method:
    """Build ``name`` from built networks (``MultiExitNetwork`` s with C1 only).

    ``sskd`` / ``feature``: options (:data:`SSKD_OPTIONS`, :data:`FEATURE_OPTIONS`; the run
    config's sections). ``loss_options``: ``beta`` (λ) and ``label_smoothing``; the logit
    methods' other options must keep their defaults. The run's epochs and SGD settings reach
    SSKD through :meth:`~dcmkd.methods.sskd.SSKD.configure_optimization`.
    """
    count, _ = STAGE_METHODS[name]
    if len(networks) != count:
        raise ValueError(f"method '{name}' needs {count} network{'s' * (count > 1)} "
                         f"({'teacher, student' if count == 2 else 'the trained network'}), "
                         f"got {len(networks)}")
    loss = _check_loss_options(name, loss_options)
    s_opts = _options(SSKD_OPTIONS, sskd, "sskd")
    f_opts = _options(FEATURE_OPTIONS, feature, "feature")
    if teacher_weights is not None:
        load_pretrained(networks[0].backbone, teacher_weights, teacher_net)
    elif name == "fixed_backbone":
        raise ValueError("fixed_backbone needs teacher_weights: the trained network to re-head")
    else:
        warnings.warn(f"'{name}' without teacher_weights: the teacher is untrained",
                      stacklevel=2)
    smoothing = float(loss.get("label_smoothing", 0.0))
    if name == "fixed_backbone":
        return FixedBackbone(networks[0], label_smoothing=smoothing)
    if name in FEATURE_METHODS:
        return FeatureKD(networks[0], networks[1], name, loss.get("beta", 1.0),
                         label_smoothing=smoothing, **f_opts)
    return SSKD(networks[0], networks[1], **s_opts, label_smoothing=smoothing)


__all__ = ["STAGE_METHODS", "SSKD_OPTIONS", "FEATURE_OPTIONS", "build_stage_method"]
