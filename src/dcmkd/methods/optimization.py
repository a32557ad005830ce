"""How methods are optimised: SGD settings, the run's learning-rate schedule, the ramp-up of
distillation weights and SSKD's plateau rule. Pure Python and torch; no config, no YAML.

A method receives an :class:`SGDSettings` and a :class:`Schedule` once, before training
(:meth:`dcmkd.methods.base.Method.configure_optimization`): the base class builds one SGD over its
trainable parameters and follows the schedule for ``schedule.epochs`` epochs; SSKD's phases
build their own optimisers and rates and use the run's schedule for the task head.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable

import torch

from dcmkd.options import check_fields, is_a, option
from dcmkd.registry import check_choice

SCHEDULES = ("step", "multistep", "cosine", "constant")
#: the config's ``optim.name`` choices (the papers' recipes: ``sgd``)
OPTIMIZERS = ("sgd", "adamw")
RAMPUP_SHAPES = ("sigmoid", "linear")


@dataclass(frozen=True)
class SGDSettings:
    """SGD with momentum, as every recipe of both papers uses (DCM supplementary §1). The rate
    comes from the :class:`Schedule`."""

    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4

    def build(self, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(list(params), lr=lr, momentum=self.momentum,
                               nesterov=self.nesterov, weight_decay=self.weight_decay)


@dataclass(frozen=True)
class AdamWSettings:
    """AdamW (Loshchilov & Hutter 2019, "Decoupled weight decay regularization", Alg. 2:
    the decay ``lr · λ · θ`` is applied to the weights directly, not through the gradient), for
    users' own models; the papers' recipes keep :class:`SGDSettings`. The rate comes from the
    :class:`Schedule`.

    Weight decay skips every parameter with at most one dimension: biases and the scales and
    shifts of normalisation layers (BatchNorm, LayerNorm, GroupNorm), the usual practice of
    BERT, timm (``param_groups_weight_decay``) and torchvision's reference scripts
    (``norm_weight_decay=0``); the paper decays every weight, and this choice is the library's.
    """

    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(f"optim: AdamW needs eps > 0 and weight_decay ≥ 0, got "
                             f"eps={self.eps}, weight_decay={self.weight_decay}")
        object.__setattr__(self, "betas", betas)

    def build(self, params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
        """Two parameter groups: decayed (≥ 2 dimensions) first, then undecayed (≤ 1)."""
        params = list(params)
        decay = [p for p in params if p.ndim > 1]
        plain = [p for p in params if p.ndim <= 1]
        groups = [{"params": g, "weight_decay": wd} for g, wd in
                  ((decay, self.weight_decay), (plain, 0.0)) if g]
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas, eps=self.eps)


def optimizer_settings(optim: dict[str, Any]) -> SGDSettings | AdamWSettings:
    """The settings of a run config's ``optim`` section: ``name`` (:data:`OPTIMIZERS`),
    ``weight_decay``, and ``momentum``/``nesterov`` (sgd) or ``betas``/``eps`` (adamw); keys
    the other optimiser uses are ignored."""
    name = optim.get("name", "sgd")
    check_choice("optimizer", name, OPTIMIZERS)
    if name == "adamw":
        defaults = AdamWSettings()
        return AdamWSettings(weight_decay=optim.get("weight_decay", defaults.weight_decay),
                             betas=tuple(optim.get("betas", defaults.betas)),
                             eps=optim.get("eps", defaults.eps))
    defaults_sgd = SGDSettings()
    return SGDSettings(momentum=optim.get("momentum", defaults_sgd.momentum),
                       nesterov=optim.get("nesterov", defaults_sgd.nesterov),
                       weight_decay=optim.get("weight_decay", defaults_sgd.weight_decay))


def milestone_rule(value: Any) -> str | None:
    """Milestones are epochs (or fractions of the epochs, ≤ 1) in non-decreasing order: two
    drops at one epoch are two drops (a schedule shortened to a few epochs can round two
    milestones to the same epoch)."""
    if not all(is_a(v, (float,)) and v >= 0 for v in value) or \
            any(b < a for a, b in zip(value, value[1:])):
        return "expected numbers ≥ 0 in increasing order (epochs, or fractions of the epochs)"
    return None


@dataclass(frozen=True)
class OptimConfig:
    """The run config's ``optim`` section: the optimiser (:func:`optimizer_settings`), the
    initial rate of the :class:`Schedule` and the loop's gradient clipping."""

    name: str = option("sgd", "optimiser: sgd (the papers') or adamw (users' own models)",
                       choices=OPTIMIZERS)
    lr: float = option(0.1, "initial learning rate", low=0, above=True)
    momentum: float = option(0.9, "SGD momentum", low=0, high=1)
    nesterov: bool = option(False, "SGD Nesterov momentum (DenseNet's recipe)")
    weight_decay: float = option(1e-4, "L2 weight decay (AdamW: decoupled)", low=0)
    clip_grad_norm: float | None = option(None, "rescale the total gradient norm to at most "
                                          "this before each step (Pascanu et al. 2013; beyond "
                                          "the papers; null: no clipping)",
                                          types=(float, None), low=0, above=True)

    def __post_init__(self) -> None:
        check_fields(self, "optim.")


@dataclass(frozen=True)
class ScheduleOptions:
    """The run config's ``schedule`` section (:class:`Schedule` without its rate and length,
    which are ``optim.lr`` and ``epochs``)."""

    name: str = option("step", "step | multistep | cosine | constant", choices=SCHEDULES)
    step_size: int = option(60, "step: epochs between drops", low=1)
    milestones: tuple[float, ...] = option((), "multistep: epochs of the drops (≤ 1: fractions "
                                           "of the run)", types=(list,), rule=milestone_rule)
    gamma: float = option(0.1, "rate factor at each drop", low=0)
    warmup_epochs: float = option(0.0, "linear warm-up from 0 (beyond the papers)", low=0)
    one_based: bool = option(False, "count drops in 1-based epochs (the official DCM code)")
    reset_momentum: bool = option(False, "a fresh optimiser at every drop (the official DCM "
                                  "code)")


@dataclass(frozen=True)
class Schedule(ScheduleOptions):
    """The learning rate as a pure function of the fractional, 0-based epoch (batch b of epoch
    e is ``e + b / batches``), so a resumed run sets exactly the same rate (SPEC.md §3).

    - ``step``: ×``gamma`` every ``step_size`` epochs (CIFAR ResNet: ÷10 every 60; ImageNet:
      every 30)
    - ``multistep``: ×``gamma`` at each milestone; milestones ≤ 1 are fractions of ``epochs``
      (DenseNet: ÷10 at 50% and 75%; WRN: ×0.2 at 60/120/160). Step schedules change at whole
      epochs, as the papers' per-epoch schedulers do.
    - ``cosine``: half a cosine from ``lr`` to 0 over the run, per iteration (MobileNetV2)
    - ``constant``
    - ``warmup_epochs``: a linear ramp from 0 before any of them (this library's option)
    - ``one_based``: drops counted in 1-based epochs, as the official DCM code does (``if epoch
      in epoch_step`` with ``epoch = state['epoch'] + 1``): a drop at 60 happens at the start of
      0-based epoch 59, one epoch before the paper's reading
    - ``reset_momentum``: each drop starts a fresh optimiser (momentum buffers cleared), as the
      official code's ``create_optimizer`` at every drop does
    """

    lr: float = option(0.1, "initial rate (the config's optim.lr)", low=0)
    epochs: int = option(200, "length of the run (the config's epochs)", low=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        check_fields(self, "schedule.")

    def __call__(self, epoch: float) -> float:
        warm = self.warmup_epochs or 0
        if warm and epoch < warm:
            return self.lr * (epoch + 1e-3) / warm
        if self.name in ("step", "multistep"):
            return self.lr * self.gamma ** self.drops(epoch)
        if self.name == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * min(epoch, self.epochs) / self.epochs))
        return self.lr

    def drops(self, epoch: float) -> int:
        """How many times a step schedule has dropped the rate by (fractional) ``epoch``."""
        whole = math.floor(epoch + 1e-9) + (1 if self.one_based else 0)
        if self.name == "step":
            return whole // self.step_size
        if self.name == "multistep":
            return sum(1 for m in self.boundaries() if whole >= m)
        return 0

    def boundaries(self) -> list[float]:
        """The epochs at which a ``multistep`` schedule drops (fractions resolved)."""
        return [m * self.epochs if m <= 1 else m for m in self.milestones]

    def with_epochs(self, epochs: int) -> "Schedule":
        """The same schedule over a phase of ``epochs`` epochs (SSKD's task head)."""
        return replace(self, epochs=int(epochs))


def rampup_factor(epoch: float, length: float, shape: str = "sigmoid") -> float:
    """Weight in [0, 1] of the distillation terms at (fractional) ``epoch`` of a ramp-up of
    ``length`` epochs (``length = 0``: always 1, the paper's constant weights).

    - ``sigmoid``: ``exp(-5 (1 - t)²)`` with ``t = epoch / length`` clipped to [0, 1], the
      ramp-up of the consistency weight of Laine & Aila (2017, "Temporal ensembling") that the
      online-distillation methods ONE (Lan et al. 2018), OKDDip (Chen et al. 2020) and PCL (Wu &
      Gong 2021) use for their distillation weight; it starts at e⁻⁵ ≈ 0.0067.
    - ``linear``: ``t``, exactly 0 at the first step.
    """
    check_choice("ramp-up shape", shape, RAMPUP_SHAPES)
    if length <= 0:
        return 1.0
    t = min(max(epoch / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2) if shape == "sigmoid" else t


@dataclass
class PlateauSchedule:
    """SSKD's per-stage learning rate (sskd-paper.md, "Implementation"): "the learning rate is
    set to 0.01 initially and decreased 10% every time the feature distance … does not decrease
    any more. When the learning rate achieves 1e-5, we suppose the current stage is well trained
    and start training the next stage."

    **Reading** of "does not decrease any more", checked once per epoch on the epoch's mean
    training distance ``d`` (what :meth:`step` receives):

    - ``d`` *improves* when ``d < best · (1 − threshold)``, ``best`` being the lowest epoch mean
      so far in this stage (``threshold = 0``: any decrease counts);
    - after more than ``patience`` epochs in a row without improvement the rate is multiplied by
      ``factor`` (0.9, "decreased 10%") and the count restarts; ``best`` is kept;
    - the stage is done as soon as the rate reaches ``min_lr`` (``lr ≤ min_lr``, up to float
      rounding); the stage does not train at that rate.

    From 0.01 this takes 66 decays (0.01·0.9⁶⁶ = 9.6e-6 ≤ 1e-5 < 0.01·0.9⁶⁵), so a stage whose
    distance never improves after its first epoch ends after exactly ``1 + 66·(patience + 1)``
    epochs. Defaults: ``patience = 0``, ``threshold = 0`` (the paper's words, literally).
    """

    lr: float = 0.01
    factor: float = 0.9
    patience: int = 0
    threshold: float = 0.0
    min_lr: float = 1e-5
    best: float = math.inf
    bad_epochs: int = 0
    decays: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.factor < 1:
            raise ValueError(f"plateau factor must be in (0, 1), got {self.factor}")
        if self.patience < 0 or self.threshold < 0 or self.min_lr <= 0 or self.lr <= 0:
            raise ValueError("plateau: patience and threshold must be ≥ 0, lr and min_lr > 0")

    @property
    def done(self) -> bool:
        return self.lr <= self.min_lr * (1 + 1e-9)

    def step(self, value: float) -> bool:
        """Account one epoch's mean distance; returns True when the rate was decreased."""
        if not math.isfinite(value):
            raise ValueError(f"plateau schedule got a non-finite distance {value}")
        if value < self.best * (1 - self.threshold):
            self.best, self.bad_epochs = value, 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.lr *= self.factor
            self.decays += 1
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)

__all__ = ["SGDSettings", "AdamWSettings", "OPTIMIZERS", "optimizer_settings", "Schedule",
           "SCHEDULES", "RAMPUP_SHAPES", "rampup_factor", "PlateauSchedule"]
