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
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from dcmkd.methods.base import Method
from dcmkd.methods.feature_kd import FEATURE_METHODS, FeatureKD
from dcmkd.methods.mutual import LossOptions
from dcmkd.methods.sskd import (ADAPTER_MODES, DEFAULT_PSI, HEAD_MODES, MIMIC_MODES,
                                PYRAMID_REDUCE_MODES, SCHEDULE_MODES, SSKD, FixedBackbone)
from dcmkd.methods.teacher import load_pretrained
from dcmkd.methods.optimization import milestone_rule
from dcmkd.options import build, check_fields, defaults, not_applying, option


def _below_one(value: float) -> str | None:
    """``sskd.imitation_psi`` < 1: at ψ = 1 no anchor passes (the mask keeps IoUs above ψ·max)."""
    return None if value < 1 else "expected a value below 1 (a box's best anchor must pass)"


@dataclass(frozen=True)
class SSKDOptions:
    """The ``sskd`` config section (see :mod:`dcmkd.methods.sskd` and the README)."""

    stages: int | list = option(4, "1–8 stages, or the unit names at which stages end",
                                types=(int, list))
    schedule: str = option("plateau", "stage rate: plateau (×factor when the distance stops "
                           "decreasing, the paper) or epochs (milestones)",
                           choices=SCHEDULE_MODES)
    lr: float = option(0.01, "stage-phase learning rate (SSKD §4.1)", low=0, above=True)
    momentum: float = option(0.9, "stage-phase SGD momentum", low=0, high=1)
    weight_decay: float | None = option(None, "stage-phase weight decay (null: the run's "
                                        "optim.weight_decay)", types=(float, None), low=0)
    factor: float = option(0.9, "plateau: rate factor when the distance stops decreasing",
                           low=0, above=True)
    patience: int = option(0, "plateau: epochs without improvement before the factor", low=0)
    threshold: float = option(0.0, "plateau: relative improvement that counts", low=0)
    min_lr: float = option(1.0e-5, "plateau: the rate a stage ends at", low=0)
    stage_epochs: int | float | None = option(None, "epochs per stage (epochs mode) or at most "
                                              "(plateau); null: the run's epochs",
                                              types=(int, float, None), low=0)
    milestones: list = option((0.3, 0.6, 0.9), "epochs mode: rate drops (≤ 1: fractions of "
                              "stage_epochs)", rule=milestone_rule)
    gamma: float = option(0.1, "epochs mode: rate factor at each milestone", low=0)
    multi_loss: bool = option(False, "SSKD Table 2: every stage loss summed and trained at once")
    head: str = option("separate", "task-head phase: separate (backbone frozen, the paper) or "
                       "end_to_end (fine-tune everything)", choices=HEAD_MODES)
    head_epochs: int | float | None = option(None, "task-head phase length (null: the run's "
                                             "epochs; 0: none)", types=(int, float, None), low=0)
    adapter: str = option("auto", "student→teacher adapter: auto (1×1 conv where channels "
                          "differ) or always", choices=ADAPTER_MODES)
    pyramid_reduce: str = option("mean", "a detector's FPN stage: the pyramid levels' mimic "
                                 "losses averaged (mean) or summed (sum)",
                                 choices=PYRAMID_REDUCE_MODES, added=True)
    mimic: str = option("l2", "stage mimic loss: l2 (the paper's Eq. 6), pearson (PKD, Cao et "
                        "al. 2022) or fine_grained (imitation mask of Wang et al. 2019; "
                        "detectors only)", choices=MIMIC_MODES, added=True)
    imitation_psi: float = option(DEFAULT_PSI, "fine_grained: the mask's threshold, ψ in [0, 1) "
                                  "times each box's best anchor IoU (Wang et al. 2019: 0.5)",
                                  low=0, rule=_below_one, added=True)

    def __post_init__(self) -> None:
        check_fields(self, "sskd.")


@dataclass(frozen=True)
class FeatureOptions:
    """The ``feature`` config section (FitNets / AT / NST)."""

    stages: int | list = option(4, "stage outputs compared by AT and NST", types=(int, list))
    hint: str | int = option("auto", "FitNets hint: auto (the stage ending at conv3_x, else the "
                             "2nd), a 1-based stage of that partition, or a unit name",
                             types=(str, int))
    reduction: str = option("sum", "AT/NST over stages: sum (the originals') or mean",
                            choices=("sum", "mean"))
    p: float = option(2.0, "AT exponent (Zagoruyko & Komodakis 2017, Eq. 2)", low=0,
                      above=True)
    degree: int = option(2, "NST polynomial kernel degree (Huang & Wang 2017)", low=1)
    c: float = option(0.0, "NST polynomial kernel constant")

    def __post_init__(self) -> None:
        check_fields(self, "feature.")


#: the ``sskd`` and ``feature`` sections at their defaults (plain mappings)
SSKD_OPTIONS: dict[str, Any] = defaults(SSKDOptions)
FEATURE_OPTIONS: dict[str, Any] = defaults(FeatureOptions)

def _used_loss_options(name: str, loss_options: dict[str, Any]) -> dict[str, Any]:
    """The loss options ``name`` uses (``beta`` as λ of FitNets/AT/NST, ``label_smoothing``);
    another option given a value other than its default is refused (:attr:`Spec.applies` of
    :class:`LossOptions`). ``rampup: auto``, the config's default, ramps nothing here."""
    loss = build(LossOptions, loss_options, f"method '{name}'")
    wrong = not_applying(LossOptions, loss_options, (name,), unchanged={"rampup": "auto"})
    if wrong:
        raise ValueError(f"loss.{wrong} does not apply to '{name}'")
    used = {"label_smoothing": loss.label_smoothing}
    if name in FEATURE_METHODS:
        used["beta"] = loss.beta
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
    loss = _used_loss_options(name, loss_options)
    s_opts = asdict(build(SSKDOptions, sskd, "sskd"))
    f_opts = asdict(build(FeatureOptions, feature, "feature"))
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


__all__ = ["SSKD_OPTIONS", "FEATURE_OPTIONS", "build_stage_method"]
