"""Every logit-distillation method of the DCM paper as one system: networks + a link matrix.

A method owns its networks (``MultiExitNetwork`` each; a network without auxiliary classifiers
has only C1) and, from one batch, returns named losses and the logits of every classifier of
every network (:class:`StepOutput`). The trainer sums the losses and steps; since every
distillation target is detached, the gradient of the sum w.r.t. network n equals that of its own
L_n (DCM Algorithm 1, step 4), so one backward pass updates all networks simultaneously.

The presets (``METHODS``) differ only in whether networks get auxiliary classifiers, the link
pattern, which networks are frozen and how loss terms are named in logs (SPEC.md §1).
"""
from __future__ import annotations

import contextlib
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from dcmkd.warn import warn
from dcmkd.heads import MultiExitNetwork
from dcmkd.losses.mutual import REDUCTIONS, LinkMatrix, MutualLoss, mutual_distillation_loss
from dcmkd.methods.base import Method, StepFn, StepOutput
from dcmkd.methods.optimization import RAMPUP_SHAPES, rampup_factor
from dcmkd.options import check_fields, option
from dcmkd.registry import UnknownNameError

UPDATE_MODES = ("simultaneous", "alternating")
#: ``loss.rampup: auto`` ramps the distillation weights over this fraction of the run's epochs.
#: Beyond the paper (which keeps β and γ constant): the 25% of the small-budget protocol that
#: issue 13 measured (quick-cifar10, loss.rampup=30 of 120 epochs) and of the demo (3 of 12);
#: the run config's default, so that a short first run does not collapse to chance.
AUTO_RAMPUP = 0.25


@dataclass(frozen=True)
class LossOptions:
    """The options of the logit-distillation methods, with their defaults: the one list of them
    (the run config's ``loss`` section is built from it). Defaults are the paper's. ``applies``
    names the methods an option is for (``logit``: every method of :data:`dcmkd.methods.METHODS`);
    a stage-wise method given another value of it refuses it."""

    alpha: float = option(1.0, "weight of the auxiliary classifiers' CE (DCM Eq. 7)", low=0,
                          applies=("logit",))
    beta: float = option(1.0, "same-staged distillation weight (DCM Eq. 8); DML's and KD's "
                         "weight; λ of FitNets/AT/NST", low=0,
                         applies=("logit", "fitnets", "at", "nst"))
    gamma: float = option(1.0, "different-staged distillation weight (DCM Eq. 9)", low=0,
                          applies=("logit",))
    temperature: float = option(1.0, "temperature T of the softened outputs (DCM Eq. 3)",
                                low=0, above=True, applies=("logit",))
    divergence: str = option("kl", "value reported: kl (Eq. 5) or ce (Eq. 2); same gradient",
                             choices=("kl", "ce"), applies=("logit",))
    t2_scaling: bool = option(False, "distillation terms × T² (Hinton et al. 2015)",
                              applies=("logit",))
    label_smoothing: float = option(0.0, "label smoothing of every cross-entropy term",
                                    low=0, high=1)
    update: str = option("simultaneous", "DCM Algorithm 1's simultaneous update, or DML's "
                         "alternating one", choices=UPDATE_MODES, applies=("logit",))
    # beyond the paper (issue 13); the defaults leave the paper's loss unchanged
    reduction: str = option("sum", "a classifier's distillation terms: sum (DCM Eq. 8, 9) or "
                            "mean (beyond the paper)", choices=REDUCTIONS, applies=("logit",))
    rampup: float | str = option(0.0, "epochs over which β and γ ramp up (0: constant, the "
                                 "paper), or auto: AUTO_RAMPUP of the run's epochs (beyond the "
                                 "paper)", types=(float, str), low=0, choices=("auto",),
                                 applies=("logit",))
    rampup_shape: str = option("sigmoid", "ramp-up curve: sigmoid (ONE/OKDDip/PCL) or linear",
                               choices=RAMPUP_SHAPES, applies=("logit",))

    def __post_init__(self) -> None:
        check_fields(self, "loss.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, options: dict[str, Any], what: str = "loss option") -> "LossOptions":
        for key in options:
            if key not in cls.names():
                raise UnknownNameError(what, key, cls.names())
        return cls(**options)

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~dcmkd.losses.mutual.mutual_distillation_loss`."""
        d = asdict(self)
        for k in ("update", "rampup", "rampup_shape"):
            d.pop(k)
        return d


@contextlib.contextmanager
def bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Run a module in training mode without changing its BatchNorm running statistics."""
    saved = {name: buf.clone() for name, buf in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in module.named_buffers():
                buf.copy_(saved[name])


class MutualMethod(Method):
    """N networks coupled by a :class:`LinkMatrix` (DCM Eq. 6–9).

    ``update="alternating"`` is DML's own schedule: networks are stepped one after another, each
    with its peers' predictions recomputed after their update (peers re-run in training mode
    with their BatchNorm statistics untouched, so every network's statistics still move exactly
    once per step). ``"simultaneous"`` (default) is DCM's Algorithm 1.
    """

    def __init__(self, networks: Sequence[MultiExitNetwork], pattern: str = "dense",
                 frozen: Sequence[int] = (), options: LossOptions | None = None,
                 term_names: dict[str, str] | None = None, **overrides: Any):
        super().__init__()
        base = asdict(options) if options is not None else {}
        self.options = LossOptions.from_dict({**base, **overrides}, "option of MutualMethod")
        self.networks = nn.ModuleList(networks)
        self.frozen = frozenset(frozen)
        for n in self.frozen:
            self.networks[n].requires_grad_(False)
        self.links = LinkMatrix.build([net.num_classifiers for net in networks], pattern,
                                      self.frozen)
        self.pattern, self.update = pattern, self.options.update
        self.distill_scale = rampup_factor(0.0, self.rampup_epochs, self.options.rampup_shape)
        self.term_names = term_names or {}
        self.classes = 0     # seen in the logits of the first step (for :meth:`advice`)
        self.train()

    @property
    def rampup_epochs(self) -> float:
        """The length of the ramp in epochs: ``loss.rampup``, or for ``"auto"``
        :data:`AUTO_RAMPUP` of the schedule's epochs (0, constant weights, before the schedule
        is known)."""
        r = self.options.rampup
        if r != "auto":
            return float(r)
        schedule = self._schedule
        return AUTO_RAMPUP * schedule.epochs if schedule is not None else 0.0

    routes_networks = True
    owner: int | None = None     # network-parallel: the one network this process trains

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pattern": self.pattern, **asdict(self.options)}

    def shard(self, owner: int, gather: Callable[[list[torch.Tensor]], list[list[torch.Tensor]]]
              ) -> None:
        if self.frozen or self.update != "simultaneous":
            raise ValueError("parallel=networks needs networks trained together at once "
                             "(dml, dml_ds, dcm, dcm1, dcm2 with loss.update=simultaneous)")
        if not 0 <= owner < len(self.networks):
            raise ValueError(f"network {owner} does not exist ({len(self.networks)} networks)")
        self.owner, self._gather = owner, gather

    def configure_optimization(self, optim: Any, schedule: Any) -> None:
        """The base's, and a warning when ``loss.rampup`` (in epochs) is longer than the run:
        the distillation weights would never reach the value the options name."""
        super().configure_optimization(optim, schedule)
        r = self.options.rampup
        if r != "auto" and float(r) > schedule.epochs:
            end = rampup_factor(schedule.epochs, float(r), self.options.rampup_shape)
            warn(f"loss.rampup={r:g} epochs is longer than the run's {schedule.epochs} epochs: "
                 f"the distillation weights end at {end:.2f} of their value; give a ramp "
                 "shorter than the run (or loss.rampup=auto, 25% of it)")

    def begin_step(self, epoch: float) -> float:
        """Sets the rate and the ramp-up factor of the distillation weights β and γ (DML's and
        KD's weight is β) for the step at ``epoch``."""
        o = self.options
        self.distill_scale = rampup_factor(epoch, self.rampup_epochs, o.rampup_shape)
        return super().begin_step(epoch)

    def _logits(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        if self.owner is not None:   # network-parallel: own logits live, the peers' gathered
            own = list(self.network(self.owner)(images))
            out = self._gather(own)
            out[self.owner] = own
            return out
        out = []
        for n, net in enumerate(self.networks):
            if n in self.frozen:
                with torch.no_grad():
                    out.append(list(net(images)))
            else:
                out.append(list(self.network(n)(images)))
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        if self.owner is not None:
            return [list(net(images)) if n == self.owner else []
                    for n, net in enumerate(self.networks)]
        return super().predict(images)

    def advice(self, epoch: int, record: dict[str, Any]) -> str | None:
        """After the second epoch, when the training cross-entropy of every trained network's
        final classifier is still at least 95% of a uniform prediction's ln(classes) under the
        paper's constant distillation weights: the slow start measured in issue 13 (the summed
        distillation gradient holds all classifiers near one uniform prediction), and the
        ramp-up that removes it. (Train accuracy tells it less well: it is averaged over
        augmented images and was 0.11–0.16 in the measured collapse on 10 classes.)"""
        o, links = self.options, self.links.count()
        distils = (links["same"] and o.beta > 0) or (links["cross"] and o.gamma > 0)
        if epoch != 1 or self.rampup_epochs > 0 or not distils or self.classes < 2 \
                or self.schedule.epochs <= 2:
            return None
        ce = [record.get(f"train/net{n}/ce") for n in self.trainable_networks]
        uniform = math.log(self.classes)
        if None in ce or min(ce) < 0.95 * uniform:   # type: ignore[type-var]
            return None
        return (f"after epoch {epoch + 1} the final classifiers' training cross-entropy is "
                f"still {min(ce):.2f}–{max(ce):.2f}, not below 95% of a uniform prediction's "
                f"ln {self.classes} = {uniform:.2f} (measured: {min(ce) / uniform:.0%}–"
                f"{max(ce) / uniform:.0%} of it): with constant distillation weights that is "
                "the slow start the README measures (DCM on a small budget: the summed "
                "distillation gradient holds every classifier near one uniform prediction); on "
                "a short schedule, ramping the weights up removes it: "
                f"loss.rampup={max(1, round(0.25 * self.schedule.epochs))} (25% of the epochs)")

    def _named(self, loss: MutualLoss, networks: Sequence[int]) -> dict[str, torch.Tensor]:
        return {f"net{n}/{self.term_names.get(t, t)}": v
                for n in networks for t, v in loss.per_network[n].items()}

    def loss(self, logits: list[list[torch.Tensor]], targets: torch.Tensor) -> MutualLoss:
        self.classes = self.classes or int(next(z for net in logits for z in net).shape[-1])
        kw, w = self.options.loss_kwargs(), self.distill_scale
        kw["beta"], kw["gamma"] = kw["beta"] * w, kw["gamma"] * w
        return mutual_distillation_loss(logits, targets, self.links, **kw,
                                        criterion=self.criterion)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        logits = self._logits(images)
        loss = self.loss(logits, targets)
        if self.owner is not None:   # this process's network: its L_n and its classifiers
            return StepOutput(self._named(loss, [self.owner]),
                              [z if n == self.owner else [] for n, z in enumerate(logits)])
        return StepOutput(self._named(loss, self.trainable_networks), logits)

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, step: StepFn,
                      autocast: Callable[[], ContextManager] = nullcontext) -> StepOutput:
        if self.update == "simultaneous" or len(self.trainable_networks) < 2:
            return super().training_step(images, targets, step, autocast)
        with autocast():
            logits = self._logits(images)
        losses: dict[str, torch.Tensor] = {}
        updated: list[int] = []
        for n in self.trainable_networks:
            # peers updated earlier in this step predict again with their new weights
            current = list(logits)
            with autocast():
                for m in updated:
                    with torch.no_grad(), bn_stats_frozen(self.networks[m]):
                        current[m] = list(self.networks[m](images))
                named = self._named(self.loss(current, targets), [n])
            step(sum(named.values()), named)  # type: ignore[arg-type]
            losses.update({k: v.detach() for k, v in named.items()})
            updated.append(n)
        return StepOutput(losses, [[z.detach() for z in net] for net in logits])


__all__ = ["MutualMethod", "LossOptions", "UPDATE_MODES", "bn_stats_frozen", "Method",
           "StepOutput"]
