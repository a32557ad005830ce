"""Stage-by-Stage Knowledge Distillation (SSKD, sskd-paper.md) and task-head retraining.

SSKD trains a student in two phases (paper Fig. 2 (b), Fig. 3, Eq. 3–6):

1. **Backbone** (Eq. 3, 5, 6): the backbone is cut into K stages, the network's stage plan
   (:func:`stage_plan`: a zoo backbone's partition, a detector's ResNet-FPN, or the stages a
   user named with ``wrap_model(model, stages=…, head=…)``; :mod:`dcmkd.methods.stages`);
   stage i of the student learns to reproduce the teacher's stage-i output,
   ``min_{Θ_{S_i}} ψ(f_i^T, f_i^S)`` with ``ψ(a, b) = ‖a − b‖²₂`` and the identity as
   ``σ̄`` (Eq. 3, "we choose σ̄ as identity function … and ψ as l2 distance"). Stages are
   trained one after another; "when training a new stage of student, we fix all parameters in
   previous stages"; the teacher is fixed; no labels are used. A 1×1 convolution maps the
   student's channels to the teacher's when they differ and the student map is resized when the
   resolutions differ (:class:`~dcmkd.methods.stages.StageAdapter`, training only).
2. **Task head** (Eq. 4): the final classifier is re-initialised and trained with cross-entropy,
   ``min_{Θ_{S_H}} φ(y, ŷ^S)``, the backbone fixed ("when training either part of
   {Θ_{S_B}, Θ_{S_H}}, the other part is fixed").

Per-stage optimisation ("Implementation"): SGD, momentum 0.9, lr 0.01, ×0.9 each time the
feature distance stops decreasing, next stage when the lr reaches 1e-5
(:class:`~dcmkd.methods.control.PlateauSchedule`, ``schedule="plateau"``), or the ImageNet
schedule, a fixed number of epochs per stage with ×0.1 at given epochs (60 epochs, 18/36/54:
``schedule="epochs"``, ``stage_epochs=60``, ``milestones=(18, 36, 54)`` or ``(0.3, 0.6, 0.9)``).

Readings and choices where the paper is silent (all documented in the README notes):

- ψ is averaged over batch, channels and positions (:func:`~dcmkd.losses.features.hint_loss`),
  not summed: the paper gives no normaliser, and the mean keeps lr 0.01 usable whatever the
  feature size.
- The distance watched by the plateau schedule is the mean of the per-batch distances over the
  epoch's training batches (before each update), see :class:`PlateauSchedule`.
- Frozen earlier stages run in evaluation mode, so their BatchNorm statistics stay fixed as their
  parameters do and later stages learn on the features the student will produce at test time.
- Weight decay in the stages: the run's ``optim.weight_decay`` unless ``sskd.weight_decay`` is
  set (the paper names only SGD, momentum and lr).
- The task head (the backbone's ``head`` module: pooling and the final linear layer, plus the
  final BN-ReLU of pre-activation nets; a user's network: its ``head=`` modules) is trained
  with the run's optimiser settings and schedule over ``head_epochs``; the paper gives no head
  schedule. ``head="end_to_end"`` instead
  fine-tunes the whole student with cross-entropy after phase 1 (an ablation in the spirit of
  paper Table 1, which compares the two for KD and a plain teacher).
- ``multi_loss=True`` is the paper's Table 2 alternative: all K stage distances summed with
  equal weights and minimised at once over the whole backbone, one phase with the same schedule.

**The mimic loss** (``mimic``, ``pyramid_reduce``, ``imitation_psi``; options, the paper's plain
l2 the default). On a detector's FPN stage ψ is computed on each pyramid level and the levels'
values are averaged (``pyramid_reduce="mean"``, the default) or summed (``"sum"``, as the
multi-level detection-distillation losses do, e.g. PKD's). ``mimic`` picks ψ:

- ``l2``: Eq. 6, :func:`~dcmkd.losses.features.hint_loss` (the default);
- ``pearson``: PKD (Cao et al., NeurIPS 2022), ½·MSE of the two maps each normalised per
  channel to zero mean and unit variance (:func:`~dcmkd.losses.features.pearson_loss`), the
  student after its adapter; on every stage, maps and pyramid levels, of any network;
- ``fine_grained``: Wang et al. (CVPR 2019), the squared error on the locations of the
  imitation mask only (:func:`~dcmkd.losses.features.imitation_mask`, ψ = ``imitation_psi``,
  0.5 the paper's; :func:`~dcmkd.losses.features.masked_hint_loss`), the mask from the
  student detector's own anchors (:func:`~dcmkd.models.detection.level_anchors`) and the
  ground-truth boxes rescaled by the detector's transform to the batch the backbone sees.
  Detectors only (a ValueError otherwise). **Choices**: the mask of each pyramid level from
  that level's anchors (each box's threshold from its best IoU on that level, the paper's
  per-feature-map rule applied level by level); the ResNet stages C2–C5, on which the detector
  places no anchors, keep the plain l2 of Eq. 6; an image without boxes masks nothing, and a
  batch without any masked location on a level gives that level 0. It uses the boxes, which
  the paper's stage phase does not ("no labels are used").
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, NamedTuple, Sequence

import torch
from torch import nn

from dcmkd.heads import MultiExitNetwork
from dcmkd.losses.features import hint_loss, imitation_mask, masked_hint_loss, pearson_loss
from dcmkd.methods.base import Method, StepFn, StepOutput
from dcmkd.methods.optimization import PlateauSchedule, Schedule, SGDSettings
from dcmkd.methods.stages import (DEFAULT_STAGES, ClassifierStagePlan, ModulePlan, StageAdapter,
                                  StagePlan, not_described, partition_stages, reset_head)
from dcmkd.models.base import Backbone
from dcmkd.registry import check_choice

SCHEDULE_MODES = ("plateau", "epochs")
HEAD_MODES = ("separate", "end_to_end")
ADAPTER_MODES = ("auto", "always")
PYRAMID_REDUCE_MODES = ("mean", "sum")
MIMIC_MODES = ("l2", "pearson", "fine_grained")
DEFAULT_PSI = 0.5


def phase_epochs(value: int | float | None, epochs: int) -> int:
    """A phase length: None → ``epochs``; a float in (0, 1] → that fraction of ``epochs`` (at
    least 1); an int → that many epochs (0: no such phase)."""
    if value is None:
        return int(epochs)
    if isinstance(value, float) and 0 < value <= 1:
        return max(1, round(value * epochs))
    if value < 0 or value != int(value):
        raise ValueError(f"a phase length is an int ≥ 0 or a fraction in (0, 1], got {value}")
    return int(value)


def stage_plan(network: nn.Module, stages: Any) -> StagePlan:
    """The stage plan (:class:`~dcmkd.methods.stages.StagePlan`) of a network: its own
    (``network.stage_plan``, e.g. a detector's ResNet-FPN), the stages its user described
    (``wrap_model(model, stages=…, head=…)``: a :class:`~dcmkd.methods.stages.ModulePlan`,
    whose K is the user's: ``stages`` must be the default 4 or K), or the zoo partition of its
    backbone; any other network is refused in one line that says how to describe its stages."""
    if hasattr(network, "stage_plan"):
        return network.stage_plan(stages)
    described = getattr(network, "stage_paths", None)
    if described is not None:
        plan = ModulePlan(network.backbone, described, sample_input=network.sample_shape)
        if stages not in (None, DEFAULT_STAGES, len(plan)):
            raise ValueError(f"{plan.model_name} has the {len(plan)} stages given to "
                             f"wrap_model(stages=...); stages={stages!r} cannot cut them "
                             f"otherwise (leave it at its default or {len(plan)})")
        return plan
    backbone = getattr(network, "backbone", network)
    if not isinstance(backbone, Backbone):
        raise not_described(backbone)
    return partition_stages(backbone, DEFAULT_STAGES if stages is None else stages)


def prepare(network: nn.Module, images: Any) -> Any:
    """The input of stage 1 (a network's ``prepare``, e.g. a detector's transform; else the
    images)."""
    return network.prepare(images) if hasattr(network, "prepare") else images


def head_modules(network: nn.Module, plan: ClassifierStagePlan) -> list[nn.Module]:
    """The task head: a network's ``head_modules()`` (a detector's RPN + RoI heads or
    RetinaNet's subnets), else its classifier plan's (the zoo backbone's ``head``, or the
    user's ``head=``)."""
    if hasattr(network, "head_modules"):
        return list(network.head_modules())
    return plan.head_modules()


class GroundTruth(NamedTuple):
    """What ``mimic="fine_grained"`` needs beside the features: the batch the backbone sees
    (``images``, the detector's transformed tensor) and each image's boxes in its
    coordinates."""

    images: torch.Tensor
    boxes: list[torch.Tensor]


def prepare_with_boxes(network: nn.Module, images: Any, targets: Any
                       ) -> tuple[torch.Tensor, GroundTruth]:
    """A detector network's stage-1 input (as :func:`prepare`: the transformed batch) and the
    targets' boxes rescaled by the same transform call (one draw of its size when it holds
    several)."""
    from dcmkd.models.detection import preprocess

    image_list, resized = preprocess(network.detector, images, targets)
    return image_list.tensors, GroundTruth(image_list.tensors,
                                           [t["boxes"] for t in resized])


def check_mimic(student: nn.Module, mimic: str, imitation_psi: float,
                pyramid_reduce: str) -> None:
    """The mimic options (module note): known names; ``fine_grained`` on detectors only;
    ``imitation_psi`` only with it, in [0, 1)."""
    check_choice("sskd mimic", mimic, MIMIC_MODES)
    check_choice("sskd pyramid_reduce", pyramid_reduce, PYRAMID_REDUCE_MODES)
    if pyramid_reduce != "mean" and getattr(student, "detector", None) is None:
        raise ValueError(f"sskd.pyramid_reduce={pyramid_reduce} applies to detectors only (the "
                         f"levels of their FPN stage); a {type(student).__name__} has no "
                         "pyramid")
    if mimic == "fine_grained" and getattr(student, "detector", None) is None:
        raise ValueError("sskd.mimic=fine_grained applies to detectors only (its mask comes from "
                         "a detector's anchors and ground-truth boxes); use l2 or pearson for "
                         f"a {type(student).__name__}")
    if not 0 <= imitation_psi < 1:
        raise ValueError(f"sskd.imitation_psi must be in [0, 1), got {imitation_psi}")
    if imitation_psi != DEFAULT_PSI and mimic != "fine_grained":
        raise ValueError(f"sskd.imitation_psi={imitation_psi} applies to "
                         f"sskd.mimic=fine_grained only (mimic is {mimic})")


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must be of one kind (two detectors of the same kind and transform,
    or two zoo networks); one line says what differs."""
    t, s = getattr(teacher, "detector", None), getattr(student, "detector", None)
    if (t is None) != (s is None):
        raise ValueError("SSKD needs a teacher and a student of one kind: "
                         f"{'a detector' if t is not None else 'a classifier'} teacher and "
                         f"{'a detector' if s is not None else 'a classifier'} student")
    if t is not None:
        from dcmkd.models.detection import check_compatible

        check_compatible(t, s)


@dataclass(frozen=True)
class Phase:
    kind: str     # "stage" (one stage), "stages" (multi-loss: all at once) or "head"
    stage: int    # 0-based stage index for "stage"
    name: str


class SSKD(Method):
    """SSKD as a training system (see the module note). ``networks = [teacher, student]``; the
    teacher is frozen; :meth:`export` gives both plain backbones, the student without adapters.

    Summary ``test_top1 = [teacher, student]``: the teacher as loaded, the student after its
    task head is trained (the run's last epoch).
    """

    def __init__(self, teacher: MultiExitNetwork, student: MultiExitNetwork, *,
                 stages: int | Sequence[str] = 4,
                 student_stages: Sequence[str] | None = None,
                 schedule: str = "plateau", lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float | None = None, factor: float = 0.9, patience: int = 0,
                 threshold: float = 0.0, min_lr: float = 1e-5,
                 stage_epochs: int | float | None = None,
                 milestones: Sequence[float] = (0.3, 0.6, 0.9), gamma: float = 0.1,
                 multi_loss: bool = False, head: str = "separate",
                 head_epochs: int | float | None = None, adapter: str = "auto",
                 pyramid_reduce: str = "mean", mimic: str = "l2",
                 imitation_psi: float = DEFAULT_PSI, label_smoothing: float = 0.0):
        super().__init__()
        check_choice("sskd schedule", schedule, SCHEDULE_MODES)
        check_choice("sskd head mode", head, HEAD_MODES)
        check_choice("sskd adapter", adapter, ADAPTER_MODES)
        phase_epochs(stage_epochs, 1), phase_epochs(head_epochs, 1)   # validate early
        if stage_epochs is not None and phase_epochs(stage_epochs, 1) < 1:
            raise ValueError(f"stage_epochs must be ≥ 1, got {stage_epochs}")
        self.networks = nn.ModuleList([teacher, student])
        self.frozen = frozenset({0})
        teacher.requires_grad_(False)
        check_pair(teacher, student)
        check_mimic(student, mimic, imitation_psi, pyramid_reduce)
        self.mimic, self.pyramid_reduce, self.imitation_psi = mimic, pyramid_reduce, imitation_psi
        self.t_part = stage_plan(teacher, stages)
        self.s_part = stage_plan(student, student_stages if student_stages is not None
                                 else stages)
        if len(self.t_part) != len(self.s_part):
            raise ValueError(f"teacher and student have {len(self.t_part)} and "
                             f"{len(self.s_part)} stages")
        self.adapters = nn.ModuleList(
            StageAdapter(s, t, always=adapter == "always")
            for s, t in zip(self.s_part.channels, self.t_part.channels))
        self.stage_schedule, self.multi_loss, self.head_mode = schedule, multi_loss, head
        self.stage_lr, self.stage_momentum, self.stage_weight_decay = lr, momentum, weight_decay
        self.plateau_options = dict(lr=lr, factor=factor, patience=patience,
                                    threshold=threshold, min_lr=min_lr)
        self.gamma, self.milestones = gamma, list(milestones)
        # phase lengths: None → the run's epochs, a float in (0, 1] → that fraction of them;
        # resolved by configure_optimization, which also gives the task head the run's SGD
        self._stage_epochs, self._head_epochs = stage_epochs, head_epochs
        self.stage_epochs = self.head_epochs = 0
        self._head_sgd = None
        self.label_smoothing = label_smoothing
        k = len(self.s_part)
        self.phases: list[Phase] = (
            [Phase("stages", -1, "stages")] if multi_loss
            else [Phase("stage", i, f"stage{i + 1}") for i in range(k)])
        if phase_epochs(head_epochs, 1) > 0:
            self.phases.append(Phase("head", -1, "head"))
        # control state (checkpointed through get_extra_state)
        self._index, self._start, self._done_epochs = 0, 0, 0
        self._dist_sum, self._dist_count = 0.0, 0
        self.plateau = PlateauSchedule(**self.plateau_options)
        self._optimizer: torch.optim.Optimizer | None = None
        self._enter()
        self.train()

    # -- phases ----------------------------------------------------------------------------
    @property
    def phase(self) -> Phase:
        return self.phases[min(self._index, len(self.phases) - 1)]

    @property
    def finished(self) -> bool:
        return self._index >= len(self.phases)

    def training_done(self, epochs: int) -> bool:
        """The run ends with its last phase, whatever the number of epochs."""
        return self.finished

    def configure_optimization(self, optim: SGDSettings, schedule: Schedule) -> None:
        """Phase lengths from the run's ``epochs`` where not set; the stages' weight decay from
        the run's unless ``weight_decay`` is set; the task head is trained with the run's SGD
        settings and ``schedule`` over ``head_epochs``."""
        self._schedule = schedule
        self.stage_epochs = max(1, phase_epochs(self._stage_epochs, schedule.epochs))
        self.head_epochs = phase_epochs(self._head_epochs, schedule.epochs)
        if self.stage_weight_decay is None:
            self.stage_weight_decay = optim.weight_decay
        self._head_sgd = optim
        self._optimizer = None

    @property
    def planned_epochs(self) -> int | None:
        if self.stage_schedule == "plateau" and self.phases[0].kind != "head":
            return None
        stages = sum(1 for p in self.phases if p.kind != "head")
        return stages * self.stage_epochs + (self.head_epochs if self.phases[-1].kind == "head"
                                             else 0)

    def evaluate_epoch(self, epoch: int) -> bool:
        """Test-set evaluation only in the task-head phase: before it the student's classifier
        is untrained and the teacher's error is constant (the run's last epoch is always
        evaluated by the trainer)."""
        return self.phase.kind == "head"

    @property
    def student(self) -> MultiExitNetwork:
        return self.networks[1]

    def trainable_modules(self) -> list[nn.Module]:
        """The modules trained in the current phase (the rest of the student is frozen)."""
        ph = self.phase
        if ph.kind == "stage":
            return [*self.s_part.modules(ph.stage), self.adapters[ph.stage]]
        if ph.kind == "stages":
            return [m for i in range(len(self.s_part)) for m in self.s_part.modules(i)] + \
                [self.adapters]
        return head_modules(self.student, self.s_part) if self.head_mode == "separate" \
            else [self.student]

    def _enter(self) -> None:
        """Trainable flags and a fresh optimiser for the current phase (also after a resume)."""
        self.student.requires_grad_(False)
        self.adapters.requires_grad_(False)
        for m in self.trainable_modules():
            m.requires_grad_(True)
        self._optimizer = None
        if self.training:
            self._apply_modes()

    def _begin_phase(self) -> None:
        """State reset at the start of a phase (not on resume): schedule, distance, head init."""
        self._done_epochs, self._dist_sum, self._dist_count = 0, 0.0, 0
        self.plateau = PlateauSchedule(**self.plateau_options)
        if self.phase.kind == "head" and not hasattr(self.student, "losses"):
            # a detector's head was never trained (its phases only trained the backbone) and
            # keeps torchvision's own initialisation (e.g. RetinaNet's prior-probability bias)
            self.s_part.reset_head()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._head_sgd is None:
            raise RuntimeError("SSKD: call configure_optimization() first")
        if self._optimizer is None:
            params = [p for p in self.parameters() if p.requires_grad]
            if self.phase.kind == "head":
                self._optimizer = self._head_sgd.build(params, 0.0)
            else:
                self._optimizer = SGDSettings(self.stage_momentum, False,
                                              self.stage_weight_decay).build(params, self.stage_lr)
        return self._optimizer

    def begin_step(self, epoch: float) -> float:
        """Sets the phase's rate (the run schedule's momentum reset does not apply: each phase
        has its own optimiser)."""
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def lr_at(self, epoch: float) -> float:
        """The rate at (global, fractional) ``epoch``: the run's schedule over the task-head
        phase, the plateau rate, or the stage's epoch schedule (milestones ≤ 1 are fractions
        of ``stage_epochs``)."""
        e = epoch - self._start
        if self.phase.kind == "head":
            return self.schedule.with_epochs(self.head_epochs)(e)
        if self.stage_schedule == "plateau":
            return self.plateau.lr
        whole = math.floor(e + 1e-9)
        miles = [m * self.stage_epochs if isinstance(m, float) and m <= 1 else m
                 for m in self.milestones]
        return self.stage_lr * self.gamma ** sum(1 for m in miles if whole >= m)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        ph = self.phase
        self._done_epochs += 1
        record: dict[str, Any] = {"sskd/phase": ph.name}
        done = False
        if ph.kind == "head":
            done = self._done_epochs >= self.head_epochs
        else:
            total, count = self.sum_over_replicas([float(self._dist_sum),
                                                   float(self._dist_count)])
            distance = total / max(count, 1)   # over every replica's samples
            record["sskd/distance"] = distance
            if self.stage_schedule == "plateau":
                self.plateau.step(distance)
                record.update({"sskd/best": self.plateau.best,
                               "sskd/next_lr": self.plateau.lr,
                               "sskd/decays": self.plateau.decays})
                done = self.plateau.done
            done = done or self._done_epochs >= self.stage_epochs
            self._dist_sum, self._dist_count = 0.0, 0
        if done:
            record["sskd/phase_done"] = ph.name
            if ph.kind != "head":
                # why the stage ended: the plateau schedule reached min_lr, or the epoch cap
                plateau_done = self.stage_schedule == "plateau" and self.plateau.done
                record["sskd/phase_end"] = "min_lr" if plateau_done else "epoch_cap"
                if self.stage_schedule == "plateau" and not plateau_done:
                    warnings.warn(
                        f"SSKD {ph.name}: the stage hit its cap of {self.stage_epochs} epochs "
                        f"with lr {self.plateau.lr:.3g} still above min_lr {self.plateau.min_lr:g} "
                        f"({self.plateau.decays} decays): the feature distance kept improving; "
                        "raise sskd.stage_epochs or sskd.threshold for a full anneal",
                        stacklevel=2)
            self._index += 1
            self._start = epoch + 1
            if not self.finished:
                self._begin_phase()
                self._enter()
        return record

    # -- checkpoint ------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"index": self._index, "start": self._start, "done_epochs": self._done_epochs,
                "dist_sum": float(self._dist_sum), "dist_count": self._dist_count,
                "plateau": self.plateau.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._index, self._start = int(state["index"]), int(state["start"])
        self._done_epochs = int(state["done_epochs"])
        self._dist_sum, self._dist_count = float(state["dist_sum"]), int(state["dist_count"])
        self.plateau = PlateauSchedule(**self.plateau_options)
        self.plateau.load_state_dict(state["plateau"])
        self._enter()

    # -- modes -----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "SSKD":
        super().train(mode)
        if mode:
            self._apply_modes()
        return self

    def _apply_modes(self) -> None:
        """Only the modules trained in this phase are in training mode: frozen stages (and the
        teacher) keep their BatchNorm statistics."""
        self.adapters.eval()
        if self.phase.kind == "head" and self.head_mode == "separate" and \
                hasattr(self.student, "losses"):
            # a detector computes its losses only in training mode: all of it in training
            # mode but its frozen backbone, which keeps its BatchNorm statistics
            self.student.train()
            for m in self.student.backbone_modules():
                m.eval()
            return
        self.student.eval()
        for m in self.trainable_modules():
            m.train()

    # -- steps -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        ph = self.phase
        if ph.kind == "head":
            return self._head_step(images, targets)
        truth = None
        if self.mimic == "fine_grained":
            x0, truth = prepare_with_boxes(self.student, images, targets)
        else:
            x0 = prepare(self.student, images)   # a detector's normalised, resized batch
        if ph.kind == "stages":
            with torch.no_grad():
                t = self.t_part.run(x0)
            s = self.s_part.run(x0)
            losses = {f"net1/stage{i + 1}": self._distance(i, si, ti, truth)
                      for i, (si, ti) in enumerate(zip(s, t))}
            return StepOutput(losses, [[], []])
        i = ph.stage
        with torch.no_grad():
            t = self.t_part.run(x0, stop=i + 1)[-1]   # the teacher only as far as stage i
            x = x0
            for j in range(i):
                x = self.s_part.run_stage(j, x)
        s = self.s_part.run_stage(i, x)
        return StepOutput({f"net1/stage{i + 1}": self._distance(i, s, t, truth)}, [[], []])

    def _distance(self, i: int, student_out: Any, teacher_out: Any,
                  truth: GroundTruth | None = None) -> torch.Tensor:
        """Eq. 6 at stage ``i``: ψ between the teacher's feature and the adapted student's
        (``mimic``: squared l2 by default); on a feature pyramid (a detector's FPN stage), ψ of
        each level, averaged over the levels (**reading**: the paper's plain L2 on each level,
        the levels weighted alike) or summed (``pyramid_reduce="sum"``). ``truth``: the boxes
        of ``mimic="fine_grained"`` (module note)."""
        s, t = self.s_part.feature(i, student_out), self.t_part.feature(i, teacher_out)
        adapter = self.adapters[i]
        if isinstance(t, torch.Tensor):
            return self._map_distance(adapter(s, t.shape[-2:]), t)
        masks = self._masks(t, truth) if self.mimic == "fine_grained" else {}
        levels = torch.stack([self._map_distance(adapter(s[k], v.shape[-2:]), v, masks.get(k))
                              for k, v in t.items()])
        return levels.mean() if self.pyramid_reduce == "mean" else levels.sum()

    def _map_distance(self, s: torch.Tensor, t: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """ψ on one map (``s`` adapted): PKD's for ``pearson``, the masked error where a
        fine-grained ``mask`` is given, else Eq. 6's l2 (module note)."""
        if self.mimic == "pearson":
            return pearson_loss(s, t)
        if mask is not None:
            return masked_hint_loss(s, t, mask)
        return hint_loss(s, t)

    def _masks(self, pyramid: dict[str, torch.Tensor], truth: GroundTruth | None
               ) -> dict[str, torch.Tensor]:
        """Each level's fine-grained imitation mask from the student detector's anchors."""
        from dcmkd.models.detection import level_anchors

        if truth is None:
            raise RuntimeError("sskd.mimic=fine_grained needs the batch's boxes")
        anchors = level_anchors(self.student.detector, truth.images, pyramid)
        return {k: imitation_mask(a, truth.boxes, self.imitation_psi)
                for k, a in anchors.items()}

    def _head_step(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        if hasattr(self.student, "losses"):   # a detector: its own task losses (Eq. 4)
            losses = self.student.losses(images, targets)
            return StepOutput({f"net1/{k}": v for k, v in losses.items()}, [[], []])
        if self.head_mode == "separate":
            with torch.no_grad():
                feats = self.s_part.forward_features(images)
            logits = self.s_part.forward_head(feats)
        else:
            logits = self.student.backbone(images)   # the network's own forward
        ce = self.criterion(logits.float(), targets, self.label_smoothing)
        return StepOutput({"net1/ce": ce}, [[], [logits]])   # Eq. 4

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, step: StepFn,
                      autocast: Callable[[], ContextManager] = nullcontext) -> StepOutput:
        with autocast():
            out = self(images, targets)
        total = out.total()
        step(total, out.losses)
        if self.phase.kind != "head":   # accumulated on the device, read once per epoch
            self._dist_sum = self._dist_sum + total.detach().float() * len(images)
            self._dist_count += len(images)
        return out


class FixedBackbone(Method):
    """Re-initialise a trained network's final classifier and train it alone with cross-entropy,
    the backbone frozen (parameters and BN statistics): sskd-paper.md Table 1, "randomly
    re-initialize the weights of the final fully-connected layer, and finally fix the backbone
    and only train the fully-connected layer with cross-entropy loss" (Eq. 4).

    The network's weights come from ``teacher_weights`` (a file or a run folder; ``teacher_net``
    picks the network of that run, e.g. 1 for the student of a ``kd`` run). Trained with the
    run's optimiser and schedule (the paper gives none for this step). The head and the
    features are those of the network's stage plan (:func:`stage_plan`: the zoo backbone's
    ``head``, or a user's ``head=``).
    """

    def __init__(self, network: MultiExitNetwork, label_smoothing: float = 0.0):
        super().__init__()
        if network.num_classifiers != 1:
            raise ValueError("fixed_backbone trains the backbone's own classifier only")
        self.networks = nn.ModuleList([network])
        self.frozen = frozenset()
        self.label_smoothing = label_smoothing
        self.plan: ClassifierStagePlan = stage_plan(network, None)  # type: ignore[assignment]
        self.plan.reset_head()
        network.requires_grad_(False)
        for m in self.plan.head_modules():
            m.requires_grad_(True)
        self.train()

    def train(self, mode: bool = True) -> "FixedBackbone":
        super().train(mode)
        if mode:
            self.networks[0].eval()
            for m in self.plan.head_modules():
                m.train()
        return self

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        with torch.no_grad():
            feats = self.plan.forward_features(images)
        logits = self.plan.forward_head(feats)
        ce = self.criterion(logits.float(), targets, self.label_smoothing)
        return StepOutput({"net0/ce": ce}, [[logits]])


__all__ = ["SSKD", "FixedBackbone", "Phase", "GroundTruth", "reset_head", "phase_epochs",
           "prepare_with_boxes", "check_mimic", "SCHEDULE_MODES", "HEAD_MODES", "ADAPTER_MODES",
           "PYRAMID_REDUCE_MODES", "MIMIC_MODES", "DEFAULT_PSI"]
