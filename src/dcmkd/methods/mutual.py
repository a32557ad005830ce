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
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from dcmkd.heads import MultiExitNetwork
from dcmkd.losses.mutual import LinkMatrix, MutualLoss, mutual_distillation_loss
from dcmkd.registry import check_choice

UPDATE_MODES = ("simultaneous", "alternating")
RAMPUP_SHAPES = ("sigmoid", "linear")


def rampup_factor(epoch: float, length: float, shape: str = "sigmoid") -> float:
    """Weight in [0, 1] of the distillation terms at (fractional) ``epoch`` of a ramp-up of
    ``length`` epochs (``length = 0``: always 1, the paper's constant weights).

    - ``sigmoid``: ``exp(-5 (1 - t)²)`` with ``t = epoch / length`` clipped to [0, 1], the
      ramp-up of the consistency weight of Laine & Aila (2017, "Temporal ensembling") that the
      online-distillation methods ONE (Lan et al. 2018), OKDDip (Chen et al. 2020) and PCL (Wu &
      Gong 2021) use for their distillation weight; it starts at e⁻⁵ ≈ 0.0067.
    - ``linear``: ``t``, exactly 0 at the first step.
    """
    if length <= 0:
        return 1.0
    t = min(max(epoch / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2) if shape == "sigmoid" else t


@dataclass
class StepOutput:
    """``losses``: named scalars ``net{n}/{term}`` whose sum is the training objective;
    ``logits[n][c]``: classifier c of network n (C1 first)."""

    losses: dict[str, torch.Tensor]
    logits: list[list[torch.Tensor]]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def total(self) -> torch.Tensor:
        return sum(self.losses.values())  # type: ignore[return-value]


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


class Method(nn.Module):
    """Interface the trainer relies on."""

    networks: nn.ModuleList
    frozen: frozenset[int]

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def training_step(self, images: torch.Tensor, targets: torch.Tensor,
                      step: Callable[..., None]) -> StepOutput:
        """Compute the losses and call ``step(loss, terms)`` (zero grads, backward, optimiser
        step) once or more; ``terms`` are the named losses summed in ``loss``."""
        out = self(images, targets)
        step(out.total(), out.losses)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        """Logits of every classifier of every network (the trainer sets eval mode)."""
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


class MutualMethod(Method):
    """N networks coupled by a :class:`LinkMatrix` (DCM Eq. 6–9).

    ``update="alternating"`` is DML's own schedule: networks are stepped one after another, each
    with its peers' predictions recomputed after their update (peers re-run in training mode
    with their BatchNorm statistics untouched, so every network's statistics still move exactly
    once per step). ``"simultaneous"`` (default) is DCM's Algorithm 1.
    """

    def __init__(self, networks: Sequence[MultiExitNetwork], pattern: str = "dense",
                 frozen: Sequence[int] = (), alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 1.0, temperature: float = 1.0, divergence: str = "kl",
                 t2_scaling: bool = False, label_smoothing: float = 0.0,
                 update: str = "simultaneous", reduction: str = "sum", rampup: float = 0.0,
                 rampup_shape: str = "sigmoid", term_names: dict[str, str] | None = None):
        super().__init__()
        check_choice("update mode", update, UPDATE_MODES)
        check_choice("ramp-up shape", rampup_shape, RAMPUP_SHAPES)
        if rampup < 0:
            raise ValueError(f"loss.rampup is a number of epochs ≥ 0, got {rampup}")
        self.networks = nn.ModuleList(networks)
        self.frozen = frozenset(frozen)
        for n in self.frozen:
            self.networks[n].requires_grad_(False)
        self.links = LinkMatrix.build([net.num_classifiers for net in networks], pattern,
                                      self.frozen)
        self.pattern, self.update = pattern, update
        self.loss_options = dict(alpha=alpha, beta=beta, gamma=gamma, temperature=temperature,
                                 divergence=divergence, t2_scaling=t2_scaling,
                                 label_smoothing=label_smoothing, reduction=reduction)
        self.rampup, self.rampup_shape = float(rampup), rampup_shape
        self.distill_scale = rampup_factor(0.0, self.rampup, rampup_shape)
        self.term_names = term_names or {}
        self.train()

    def set_progress(self, epoch: float) -> None:
        """Tell the method where training is (fractional epoch): sets the ramp-up factor of
        the distillation weights β and γ (DML's and KD's weight is β)."""
        self.distill_scale = rampup_factor(epoch, self.rampup, self.rampup_shape)

    def _logits(self, images: torch.Tensor) -> list[list[torch.Tensor]]:
        out = []
        for n, net in enumerate(self.networks):
            if n in self.frozen:
                with torch.no_grad():
                    out.append(list(net(images)))
            else:
                out.append(list(net(images)))
        return out

    def _named(self, loss: MutualLoss, networks: Sequence[int]) -> dict[str, torch.Tensor]:
        return {f"net{n}/{self.term_names.get(t, t)}": v
                for n in networks for t, v in loss.per_network[n].items()}

    def loss(self, logits: list[list[torch.Tensor]], targets: torch.Tensor) -> MutualLoss:
        o = self.loss_options
        w = self.distill_scale
        return mutual_distillation_loss(logits, targets, self.links,
                                        **{**o, "beta": o["beta"] * w, "gamma": o["gamma"] * w})

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> StepOutput:
        logits = self._logits(images)
        loss = self.loss(logits, targets)
        return StepOutput(self._named(loss, self.trainable_networks), logits)

    def training_step(self, images: torch.Tensor, targets: torch.Tensor,
                      step: Callable[..., None]) -> StepOutput:
        if self.update == "simultaneous" or len(self.trainable_networks) < 2:
            return super().training_step(images, targets, step)
        logits = self._logits(images)
        losses: dict[str, torch.Tensor] = {}
        updated: list[int] = []
        for n in self.trainable_networks:
            # peers updated earlier in this step predict again with their new weights
            current = list(logits)
            for m in updated:
                with torch.no_grad(), bn_stats_frozen(self.networks[m]):
                    current[m] = list(self.networks[m](images))
            loss = self.loss(current, targets)
            named = self._named(loss, [n])
            step(sum(named.values()), named)  # type: ignore[arg-type]
            losses.update({k: v.detach() for k, v in named.items()})
            updated.append(n)
        return StepOutput(losses, [[z.detach() for z in net] for net in logits])
