"""Methods that own their optimisation: phases, optimisers, learning rates and run length.

Most methods are trained by the trainer's one SGD optimiser over all trainable parameters, with
the run's schedule (``optim``, ``schedule``, ``epochs``). A :class:`PhasedMethod` instead says
itself what is trained when (SSKD: one phase per stage, then the task head), with which optimiser
and rate, and when the run is over. The trainer stays method-agnostic; per epoch it calls::

    method.train()
    for every batch:  lr = method.lr_at(epoch + b / batches, run_schedule)
                      set lr on method.optimizer's groups; method.training_step(x, y, step)
    evaluate, if method.evaluate_epoch(epoch)   # the last epoch always
    record.update(method.end_epoch(epoch))      # may move to the next phase
    checkpoint (the method's state_dict holds its control state and optimizer state)
    stop when method.finished

``run_schedule(e, n)`` is the run's own schedule (``optim.lr`` and ``schedule.*``) at epoch ``e``
of an ``n``-epoch phase, for phases that follow it (SSKD's task-head phase).

:class:`PlateauSchedule` is the "×factor each time the monitored value stops decreasing, stop at
``min_lr``" controller of SSKD's per-stage schedule.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from dcmkd.methods.mutual import Method

RunSchedule = Callable[[float, int], float]


class PhasedMethod(Method):
    """A method that owns its optimiser, learning rate and length (see the module note).

    Subclasses implement :attr:`optimizer`, :meth:`lr_at`, :meth:`end_epoch` and
    :attr:`finished`, and keep whatever they need to resume exactly in their ``state_dict``
    (``get_extra_state`` / ``set_extra_state``), restored *before* the trainer loads the state of
    :attr:`optimizer`.
    """

    owns_optimization = True

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of the current phase (it may change after :meth:`end_epoch`)."""
        raise NotImplementedError

    def lr_at(self, epoch: float, run_schedule: RunSchedule) -> float:
        """The rate for the step at (fractional, 0-based, global) ``epoch``."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Called after epoch ``epoch`` (0-based) was trained and evaluated; returns entries for
        the epoch's metrics record and may advance the phase."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        raise NotImplementedError

    def evaluate_epoch(self, epoch: int) -> bool:
        """Whether the trainer evaluates on the test set after epoch ``epoch`` (default: always;
        the last epoch of the run is always evaluated, for the summary)."""
        return True

    @property
    def planned_epochs(self) -> int | None:
        """The run's length when it is known in advance (for logs), else None."""
        return None


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


__all__ = ["PhasedMethod", "PlateauSchedule", "RunSchedule"]
