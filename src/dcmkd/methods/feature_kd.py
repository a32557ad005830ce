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

**A user's own classifier** (``wrap_model(model, stages=…, head=…)``): the stages it names
(:class:`~dcmkd.methods.stages.ModulePlan`); AT and NST compare every stage's output, FitNets'
``hint="auto"`` is the stage ending at a module named ``layer2``/``conv3_x``, else the 2nd.

**Detectors** (torchvision Faster R-CNN + FPN and RetinaNet, :class:`~dcmkd.tasks.detection.
DetectorNetwork`; the SSKD paper runs no feature baseline on detection, so everything here is a
**reading** that carries the classification settings over): the supervised term is the
detector's own loss dict (each term logged as ``net1/<term>``, summed, as plain training), in
place of CE; the transfer term is the same ``λ · c · ψ``. Features come from SSKD's stage plan of
the detector (:class:`~dcmkd.models.detection.ResNetFPNPlan`: ``conv1+layer1``, ``layer2``,
``layer3``, ``layer4``, ``fpn``), recorded during the student's own forward
(:meth:`~dcmkd.models.detection.ResNetFPNPlan.record`, so its stages run once), while the
teacher runs its plan on the very batch the student's backbone received, in eval mode under
``no_grad`` and only up to the last stage compared:

- AT and NST compare the four ResNet stage outputs C2–C5 (``map_stages``; "four output features
  from down-sampling layers", as on classifiers), not the FPN levels; both are width-free, so a
  ResNet-50 teacher (C2–C5 of 256–2048 channels) teaches a ResNet-18 (64–512) as is;
  ``feature.stages`` must stay 4;
- FitNets' hint (``hint="auto"``) is the stage ending at ``layer2`` (torchvision's name of
  ``conv3_x``: C3, stride 8, the paper's 28×28 at 224 px), with the regressor from the student's
  to the teacher's width; ``hint="fpn"`` (or 5) hints the FPN instead: one regressor shared by
  the pyramid levels (as the task heads are), ψ the mean of the levels' hint MSEs (SSKD's
  pyramid mimic, :meth:`dcmkd.methods.sskd.SSKD._distance`).

Teacher and student must be detectors of one kind and transform (:func:`~dcmkd.methods.sskd.
check_pair`), so both see one resized batch and their C-levels have equal sizes.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from dcmkd.losses.features import (HintRegressor, attention_transfer_loss, hint_loss,
                                   nst_loss_multi)
from dcmkd.methods.base import Method, StepOutput
from dcmkd.methods.sskd import check_pair, stage_plan
from dcmkd.methods.stages import StagePlan
from dcmkd.registry import UnknownNameError

FEATURE_METHODS = ("fitnets", "at", "nst")

#: the constant each original paper puts before its weight: AT's β/2, NST's λ/2, FitNets' λ
WEIGHT_FACTOR = {"fitnets": 1.0, "at": 0.5, "nst": 0.5}

#: the unit FitNets' ``hint="auto"`` ends at: the zoo's ``conv3_x`` or torchvision's ``layer2``
AUTO_HINT_UNITS = ("conv3_x", "layer2")


def hint_stage(partition: StagePlan, hint: int | str) -> int:
    """0-based index of FitNets' hint stage in a stage plan (its ``names``): ``"auto"`` (the
    stage ending at ``conv3_x`` / ``layer2``, else the 2nd), a 1-based stage number, or the
    unit name a stage ends at."""
    ends = [name.split("+")[-1] for name in partition.names]
    if hint == "auto":
        auto = [i for i, e in enumerate(ends) if e in AUTO_HINT_UNITS]
        return auto[0] if auto else min(1, len(ends) - 1)
    if isinstance(hint, str):
        if hint not in ends:
            raise UnknownNameError("hint stage", hint, ends)
        return ends.index(hint)
    if not 1 <= hint <= len(ends):
        raise ValueError(f"hint stage must be 1..{len(ends)}, got {hint}")
    return hint - 1


class FeatureKD(Method):
    """``L_task + λ · c · L_feat`` from a frozen teacher (first network) to a student (second),
    ``c`` the original paper's constant (:data:`WEIGHT_FACTOR`); ``L_task`` is CE for
    classifiers, the detector's own losses for detectors (module note).

    ``kind``: ``fitnets``, ``at`` or ``nst``; ``weight``: λ; ``stages``: the partition whose
    outputs AT and NST compare (4, the paper's; a detector's plan is fixed, C2–C5); ``hint``:
    FitNets' hint (teacher) and guided (student) stage (:func:`hint_stage`); ``reduction``: how
    AT/NST combine the stages (``sum``, the originals', or ``mean``); ``p``: AT's exponent;
    ``degree`` and ``c``: NST's polynomial kernel.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, kind: str,
                 weight: float, *, stages: int | Sequence[str] = 4, hint: int | str = "auto",
                 reduction: str = "sum", p: float = 2.0, degree: int = 2, c: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if kind not in FEATURE_METHODS:
            raise ValueError(f"unknown feature method {kind!r}; valid: {FEATURE_METHODS}")
        self.detection = hasattr(student, "losses")
        check_pair(teacher, student)
        if self.detection:
            if stages != 4:
                raise ValueError(f"feature.stages={stages!r}: on a ResNet-FPN detector AT and "
                                 "NST compare the 4 ResNet stage outputs C2..C5 (leave it at 4)")
            if label_smoothing:
                raise ValueError("loss.label_smoothing does not apply to a detector's losses")
        elif student.num_classifiers != 1 or teacher.num_classifiers != 1:
            raise ValueError(f"{kind} uses the networks' own classifiers only")
        self.kind, self.weight = kind, float(weight)
        self.networks = nn.ModuleList([teacher, student])
        self.frozen = frozenset({0})
        teacher.requires_grad_(False)
        self.t_part = stage_plan(teacher, stages)
        self.s_part = stage_plan(student, stages)
        if len(self.t_part) != len(self.s_part):
            raise ValueError(f"teacher and student have {len(self.t_part)} and "
                             f"{len(self.s_part)} stages")
        self.hint = hint_stage(self.s_part, hint)
        #: the stages whose features the transfer term compares
        self.compared = [self.hint] if kind == "fitnets" else list(self.s_part.map_stages)
        self.reduction = reduction
        self.loss_options = dict(p=p) if kind == "at" else dict(degree=degree, c=c)
        self.label_smoothing = label_smoothing
        self.regressor = (HintRegressor(self.s_part.channels[self.hint],
                                        self.t_part.channels[self.hint])
                          if kind == "fitnets" else None)
        self.train()

    def teacher_features(self, x: Any) -> dict[int, Any]:
        """The teacher's compared features on ``x`` (the input of stage 1), its stages run
        under ``no_grad`` only as far as the last compared one."""
        with torch.no_grad():
            outs = self.t_part.run(x, stop=max(self.compared) + 1)
        return {i: self.t_part.feature(i, outs[i]) for i in self.compared}

    def transfer_loss(self, x: Any, student_feats: Sequence[Any] | dict[int, Any]
                      ) -> torch.Tensor:
        """The unweighted ψ between the teacher's and the student's features on ``x`` (the
        input of stage 1); ``student_feats[i]`` is the student's feature of stage ``i``."""
        t_feats = self.teacher_features(x)
        if self.kind == "fitnets":
            s, t = student_feats[self.hint], t_feats[self.hint]
            if isinstance(t, torch.Tensor):
                return hint_loss(self.regressor(s, t.shape[-2:]), t)
            return torch.stack([hint_loss(self.regressor(s[k], v.shape[-2:]), v)
                                for k, v in t.items()]).mean()   # a pyramid: mean over levels
        s_list = [student_feats[i] for i in self.compared]
        t_list = [t_feats[i] for i in self.compared]
        if self.kind == "at":
            return attention_transfer_loss(s_list, t_list, reduction=self.reduction,
                                           **self.loss_options)
        return nst_loss_multi(s_list, t_list, reduction=self.reduction, **self.loss_options)

    def forward(self, images: Any, targets: Any) -> StepOutput:
        if self.detection:
            return self._detector_step(images, targets)
        feats = self.s_part.run(images)
        logits = self.s_part.forward_head(feats[-1])
        ce = self.criterion(logits.float(), targets, self.label_smoothing)
        loss = self.weight * WEIGHT_FACTOR[self.kind] * self.transfer_loss(images, feats)
        return StepOutput({"net1/ce": ce, f"net1/{self.kind}": loss}, [[], [logits]])

    def _detector_step(self, images: list[torch.Tensor], targets: list[dict]) -> StepOutput:
        """The detector's own losses, the compared features recorded on the way."""
        with self.s_part.record(self.compared) as seen:
            losses = self.networks[1].losses(images, targets)
        out = {f"net1/{k}": v for k, v in losses.items()}
        out[f"net1/{self.kind}"] = (self.weight * WEIGHT_FACTOR[self.kind]
                                    * self.transfer_loss(seen.input, seen.features))
        return StepOutput(out, [[], []])


__all__ = ["FeatureKD", "FEATURE_METHODS", "WEIGHT_FACTOR", "AUTO_HINT_UNITS", "hint_stage"]
