"""Feature-distillation baselines of the SSKD paper: FitNets, AT and NST as training systems.

sskd-paper.md, "Settings for Competitors" and Eq. 2: the student minimises
``L_S = φ(y, ŷ^S) + λ · ψ(σ(f^T), σ(f^S))`` (cross-entropy plus a weighted transfer loss), the
teacher frozen; λ is the paper's per-setting loss weight (SPEC.md §4):

=========  ================================================  ==========  =========
method     transfer loss ψ                                    CIFAR-100   ImageNet
=========  ================================================  ==========  =========
fitnets    hint MSE, regressed student map (Romero et al.)   λ = 100     λ = 10
at         attention transfer (Zagoruyko & Komodakis)        λ = 50      λ = 10
nst        MMD², polynomial kernel (Huang & Wang)            λ = 1000    λ = 100
=========  ================================================  ==========  =========

Each transfer term is the one its own paper writes, with the SSKD λ in the place of that paper's
weight (**readings**; the SSKD paper names the weights "α in KD, λ in FitNets and NST, and the
divisor of β in AT" and nothing more):

- FitNets: ``λ · mean((r(f_S) − f_T)²)`` (:func:`~dcmkd.losses.features.hint_loss`);
- AT (Zagoruyko & Komodakis §3.1): ``β/2 · Σ_j ‖Q_S^j − Q_T^j‖²`` where "β = 10³ divided by the
  number of elements in the attention map and the batch size"; the SSKD loss weight takes the
  place of that 10³, so the term is ``λ/2 · Σ_j mean((Q_S^j − Q_T^j)²)`` over the 4 stages;
- NST (Huang & Wang, Eq. 2 ``H + λ/2 · L_MMD²``): ``λ/2 · Σ_j MMD²_j`` over the 4 stages;
- KD with T = 4, λ = 10 / 15 is the ``kd`` preset with ``loss.temperature=4``,
  ``loss.t2_scaling=true`` and ``loss.beta=λ``: ``CE + λ·T²·KL``
  (:func:`dcmkd.losses.soft_targets.hinton_kd_loss`; the SSKD footnote "α = 0.2 ≡ λ = 4" fixes
  only the ratio of the two terms, and T²·KL is Hinton et al.'s term).

``feature.reduction=mean`` averages over the stages instead of summing (4× weaker).

Which features ("Settings for Competitors"): "For AT and NST, we compute the transfer loss with
four output features from down-sampling layers, which is the same as SSKD" — the outputs of the
SSKD 4-stage partition (:mod:`dcmkd.methods.stages`) of teacher and student. "For FitNets, we use
the features with resolution 28×28 as the intermediate hint layer" — on ImageNet ResNets the
output of ``conv3_x`` (28×28 at 224 px), the middle one of ResNet's residual groups
(``hint="auto"``: the stage that ends at ``conv3_x``, else the 2nd stage). **Reading** for CIFAR
(the paper is silent): the same unit, ``conv3_x`` (16×16), again the middle residual group, as
FitNets' hint is a middle layer; ``feature.hint`` picks another stage (1-based) or unit. FitNets is trained in one phase with the loss weight (as
the SSKD paper's description of it as a λ-weighted method implies), not with Romero et al.'s
separate hint pre-training. The regressor is :class:`~dcmkd.losses.features.HintRegressor`
(1×1 conv + BN, the student map resized to the teacher's), discarded at export.

The loss functions and their normalisation readings are those of :mod:`dcmkd.losses.features`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dcmkd.heads import MultiExitNetwork
from dcmkd.losses.features import (HintRegressor, attention_transfer_loss, hint_loss,
                                   nst_loss_multi)
from dcmkd.methods.base import Method, StepOutput
from dcmkd.methods.stages import StagePartition, partition_stages
from dcmkd.registry import UnknownNameError

FEATURE_METHODS = ("fitnets", "at", "nst")

#: the constant each original paper puts before its weight: AT's β/2, NST's λ/2, FitNets' λ
WEIGHT_FACTOR = {"fitnets": 1.0, "at": 0.5, "nst": 0.5}


def hint_stage(partition: StagePartition, hint: int | str) -> int:
    """0-based index of FitNets' hint stage: ``"auto"`` (the stage ending at ``conv3_x``, else
    the 2nd), a 1-based stage number, or the unit name a stage ends at."""
    ends = [seg.name.split("+")[-1] for seg in partition.segments]
    if hint == "auto":
        return ends.index("conv3_x") if "conv3_x" in ends else min(1, len(ends) - 1)
    if isinstance(hint, str):
        if hint not in ends:
            raise UnknownNameError("hint stage", hint, ends)
        return ends.index(hint)
    if not 1 <= hint <= len(ends):
        raise ValueError(f"hint stage must be 1..{len(ends)}, got {hint}")
    return hint - 1


class FeatureKD(Method):
    """``CE + λ · c · L_feat`` from a frozen teacher (first network) to a student (second),
    ``c`` the original paper's constant (:data:`WEIGHT_FACTOR`).

    ``kind``: ``fitnets``, ``at`` or ``nst``; ``weight``: λ; ``stages``: the partition whose
    outputs AT and NST compare (4, the paper's); ``hint``: FitNets' hint (teacher) and guided
    (student) stage (:func:`hint_stage`); ``reduction``: how AT/NST combine the stages (``sum``,
    the originals', or ``mean``); ``p``: AT's exponent; ``degree`` and ``c``: NST's polynomial
    kernel.
    """

    def __init__(self, teacher: MultiExitNetwork, student: MultiExitNetwork, kind: str,
                 weight: float, *, stages: int | Sequence[str] = 4, hint: int | str = "auto",
                 reduction: str = "sum", p: float = 2.0, degree: int = 2, c: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if kind not in FEATURE_METHODS:
            raise ValueError(f"unknown feature method {kind!r}; valid: {FEATURE_METHODS}")
        if student.num_classifiers != 1 or teacher.num_classifiers != 1:
            raise ValueError(f"{kind} uses the networks' own classifiers only")
        self.kind, self.weight = kind, float(weight)
        self.networks = nn.ModuleList([teacher, student])
        self.frozen = frozenset({0})
        teacher.requires_grad_(False)
        self.t_part = partition_stages(teacher.backbone, stages)
        self.s_part = partition_stages(student.backbone, stages)
        if len(self.t_part) != len(self.s_part):
            raise ValueError(f"teacher and student have {len(self.t_part)} and "
                             f"{len(self.s_part)} stages")
        self.hint = hint_stage(self.s_part, hint)
        self.reduction = reduction
        self.loss_options = dict(p=p) if kind == "at" else dict(degree=degree, c=c)
        self.label_smoothing = label_smoothing
        self.regressor = (HintRegressor(self.s_part.channels[self.hint],
                                        self.t_part.channels[self.hint])
                          if kind == "fitnets" else None)
        self.train()

    def transfer_loss(self, images: torch.Tensor, student_feats: list[torch.Tensor]
                      ) -> torch.Tensor:
        """The unweighted ψ between the teacher's and the student's features on ``images``."""
        if self.kind == "fitnets":
            with torch.no_grad():
                t = self.t_part.run(images, stop=self.hint + 1)[-1]
            s = self.regressor(student_feats[self.hint], t.shape[-2:])
            return hint_loss(s, t)
        with torch.no_grad():
            t_feats = self.t_part.run(images)
        if self.kind == "at":
            return attention_transfer_loss(student_feats, t_feats, reduction=self.reduction,
                                           **self.loss_options)
        return nst_loss_multi(student_feats, t_feats, reduction=self.reduction,
                              **self.loss_options)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        student = self.networks[1].backbone
        feats = self.s_part.run(images)
        logits = student.forward_head(feats[-1])
        ce = self.criterion(logits.float(), targets, self.label_smoothing)
        loss = self.weight * WEIGHT_FACTOR[self.kind] * self.transfer_loss(images, feats)
        return StepOutput({"net1/ce": ce, f"net1/{self.kind}": loss}, [[], [logits]])


__all__ = ["FeatureKD", "FEATURE_METHODS", "WEIGHT_FACTOR", "hint_stage"]
