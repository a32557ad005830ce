"""The method interface: what the training loop (:func:`dcmkd.engine.fit`) knows of a method.

A method is a training system (Lightning's "systems vs models"): it owns its networks, turns a
batch into named losses and the logits of every classifier (:meth:`Method.forward`), and says how
it is optimised. The loop calls, top to bottom::

    method.configure_optimization(sgd_settings, schedule)    # once, before any checkpoint load
    while not method.training_done(epochs_trained):
        method.train()
        for every batch:  method.begin_step(epoch + b / batches)  # sets the rate (and ramps)
                          method.training_step(x, y, step, autocast)
        evaluate, if method.evaluate_epoch(epoch)             # the last epoch always
        record.update(method.end_epoch(epoch))                # may move to a next phase
        checkpoint: method.state_dict() and method.optimizer.state_dict()

The base class gives the usual optimisation: one SGD over the trainable parameters, the run's
schedule, ``schedule.epochs`` epochs. A method with phases (SSKD) overrides ``optimizer``,
``lr_at``, ``end_epoch``, ``training_done`` and ``evaluate_epoch``, and keeps what it needs to
resume in its ``state_dict`` (restored before the loop loads the optimiser's state).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from dcmkd.methods.optimization import Schedule, SGDSettings

#: ``step(loss, terms)``: zero the gradients, back-propagate ``loss``, step the optimiser
StepFn = Callable[..., None]


@dataclass
class StepOutput:
    """``losses``: named scalars ``net{n}/{term}`` whose sum is the training objective;
    ``logits[n][c]``: classifier c of network n (C1 first; a method may leave a network out)."""

    losses: dict[str, torch.Tensor]
    logits: list[list[torch.Tensor]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


class Method(nn.Module):
    """Base of every method (see the module note)."""

    networks: nn.ModuleList
    frozen: frozenset[int]
    name: str = ""    # the registry name (create_method sets it)
    #: what a batch is and how a model is evaluated (:mod:`dcmkd.tasks`); None: classification
    task: Any = None
    _schedule: Schedule | None = None
    _optimizer: torch.optim.Optimizer | None = None
    _drops: int | None = None   # rate drops before the last step (for reset_momentum)

    def describe(self) -> dict[str, Any]:
        """What defines this method, for a run's ``config.yaml`` (subclasses add their
        options)."""
        return {"name": self.name or type(self).__name__, "frozen": sorted(self.frozen)}

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
        """The supervised loss of one classifier's logits: the task's (cross-entropy for
        classification, the margin loss of a face task)."""
        if self.task is None:
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        return self.task.criterion(logits, targets, label_smoothing)

    # -- the step ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, step: StepFn,
                      autocast: Callable[[], ContextManager] = nullcontext) -> StepOutput:
        """Compute the losses under ``autocast`` (forward and loss only) and call
        ``step(loss, terms)`` once or more, outside it; ``terms`` are the named losses summed
        in ``loss``."""
        with autocast():
            out = self(images, targets)
        step(out.total(), out.losses)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Logits of every classifier of every network (the loop sets eval mode)."""
        return [list(net(images)) for net in self.networks]

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for n in self.frozen:
            self.networks[n].eval()  # a frozen teacher keeps its BN statistics and no dropout
        return self

    def export(self) -> list[nn.Module]:
        """The plain backbones, without auxiliary classifiers."""
        return [net.export() for net in self.networks]

    @property
    def trainable_networks(self) -> list[int]:
        return [n for n in range(len(self.networks)) if n not in self.frozen]

    # -- several processes (dcmkd.engine.distributed) ------------------------------------------
    #: True when every forward of a trainable network goes through :meth:`network`, so the
    #: loop may route it through a DistributedDataParallel wrapper; otherwise (a method that
    #: runs parts of its networks, as SSKD's stages do) the loop averages the gradients over
    #: the data replicas after each backward
    routes_networks: bool = False

    @staticmethod
    def sum_over_replicas(values: list[float]) -> list[float]:
        """Numbers summed over the data replicas (one process: themselves); the loop replaces
        it under torchrun. For a method's own decisions from training statistics (SSKD's
        plateau rule), so every replica decides alike."""
        return values

    def network(self, n: int) -> nn.Module:
        """What network ``n``'s forward goes through: the network, or its wrapper."""
        return self.__dict__.get("_routes", {}).get(n, self.networks[n])

    def route(self, n: int, module: nn.Module) -> None:
        """Send network ``n``'s forward through ``module`` (a DDP wrapper of it; kept out of
        the state_dict)."""
        self.__dict__.setdefault("_routes", {})[n] = module

    def shard(self, owner: int, gather: Callable[[list[torch.Tensor]], list[list[torch.Tensor]]]
              ) -> None:
        """Network-parallel training: this process trains network ``owner`` only; ``gather``
        turns its classifiers' logits into every network's (the peers' detached)."""
        raise ValueError(f"parallel=networks is for the mutual methods (dml, dml_ds, dcm, dcm1, "
                         f"dcm2), not '{self.name or type(self).__name__}'")

    # -- optimisation (the base: one SGD, the run's schedule) -----------------------------------
    def configure_optimization(self, optim: SGDSettings, schedule: Schedule) -> None:
        """Receive the run's optimiser settings and schedule (before training and before a
        checkpoint's optimiser state is loaded)."""
        self._schedule = schedule
        self._optimizer = optim.build((p for p in self.parameters() if p.requires_grad),
                                      schedule(0.0))

    @property
    def schedule(self) -> Schedule:
        if self._schedule is None:
            raise RuntimeError(f"{type(self).__name__}: call configure_optimization() first")
        return self._schedule

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of the current step."""
        if self._optimizer is None:
            raise RuntimeError(f"{type(self).__name__}: call configure_optimization() first")
        return self._optimizer

    def lr_at(self, epoch: float) -> float:
        """The rate of the step at (fractional, 0-based) ``epoch``."""
        return self.schedule(epoch)

    def begin_step(self, epoch: float) -> float:
        """Called before every training step: sets the rate on the optimiser (subclasses also
        advance their own per-step schedules); returns the rate. With the schedule's
        ``reset_momentum``, the step at which the rate drops starts with cleared momentum."""
        if self.schedule.reset_momentum:
            # the drops before this step (a whole-epoch step resumed from a checkpoint
            # compares with the epoch before, so a resume resets exactly as a straight run)
            before = self._drops if self._drops is not None else self.schedule.drops(
                epoch - 1e-6)
            now = self._drops = self.schedule.drops(epoch)
            if now > before:
                self.optimizer.state.clear()
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Called after epoch ``epoch`` (0-based) was trained; returns entries for that epoch's
        metrics record."""
        return {}

    def advice(self, epoch: int, record: dict[str, Any]) -> str | None:
        """A hint for the user after epoch ``epoch`` (0-based) from its metrics ``record``, when
        the run shows a known trouble with a known remedy; the loop warns with it."""
        return None

    def training_done(self, epochs: int) -> bool:
        """Whether training is over after ``epochs`` epochs."""
        return epochs >= self.schedule.epochs

    def evaluate_epoch(self, epoch: int) -> bool:
        """Whether the test set is worth evaluating after epoch ``epoch`` (the loop evaluates
        the last epoch of a run in any case)."""
        return True

    @property
    def planned_epochs(self) -> int | None:
        """The run's length when it is known in advance (for logs), else None."""
        return self.schedule.epochs


__all__ = ["Method", "StepOutput", "StepFn"]
