"""DCM and DML as plain loss functions, for any training loop (plain PyTorch, Lightning, …).

Each function takes the logits of every network and returns one loss per network. Network n's
loss is built from its own logits only, with its peers' predictions as detached targets (DCM
Algorithm 1, step 4), so ``sum(losses).backward()`` gives every network exactly the gradient of
its own loss and one optimiser step updates them all, as DCM does. The math lives in
:func:`dcmkd.losses.mutual.mutual_distillation_loss` (Eq. 6–9); these are thin front ends.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from dcmkd.losses.mutual import LinkMatrix, mutual_distillation_loss

Logits = torch.Tensor | Sequence[torch.Tensor]


def dcm_loss(logits: Sequence[Logits], targets: torch.Tensor, pattern: str = "dense", *,
             alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
             temperature: float = 1.0, frozen: Iterable[int] = (), divergence: str = "kl",
             t2_scaling: bool = False, label_smoothing: float = 0.0) -> list[torch.Tensor]:
    """One loss per network, DCM Eq. 6: for network n with classifiers c (C1 first),

        L_n = CE(z[n][C1], y) + α Σ_{c≥2} CE(z[n][c], y)
            + β Σ_{m≠n} Σ_c KL(P[m][c] ‖ P[n][c]) + γ Σ_{m≠n} Σ_{i≠j} KL(P[m][i] ‖ P[n][j])

    with P = softmax(z / T) and the peers' P detached. ``logits[n]`` is network n's list of
    logits ``[C1, C2, …]`` (what a :class:`~dcmkd.heads.MultiExitNetwork` returns) or a single
    tensor. ``pattern`` picks the links (:meth:`LinkMatrix.build`): ``dense`` (DCM), ``same``
    (DCM-1, Eq. 8), ``cross`` (DCM-2, Eq. 9), ``final`` (DML / DML+DS), ``none`` (DS).
    ``frozen`` networks teach without learning (KD). Paper defaults: α = β = γ = T = 1.
    """
    nets = [[z] if isinstance(z, torch.Tensor) else list(z) for z in logits]
    links = LinkMatrix.build([len(z) for z in nets], pattern, frozen)
    loss = mutual_distillation_loss(nets, targets, links, alpha=alpha, beta=beta, gamma=gamma,
                                    temperature=temperature, divergence=divergence,
                                    t2_scaling=t2_scaling, label_smoothing=label_smoothing)
    return [loss.total(n) for n in range(len(nets))]


def dml_loss(logits: Sequence[Logits], targets: torch.Tensor, *, beta: float = 1.0,
             temperature: float = 1.0) -> list[torch.Tensor]:
    """Deep mutual learning: ``CE(z_n, y) + β Σ_{m≠n} KL(P_m ‖ P_n)`` per network.

    Only each network's final logits (C1; the first of a list) are used. Peers' terms are summed,
    as DCM writes DML; DML's own paper averages them over N-1 peers (``beta=1/(N-1)``).
    """
    finals = [z if isinstance(z, torch.Tensor) else z[0] for z in logits]
    return dcm_loss(finals, targets, "final", beta=beta, temperature=temperature)


__all__ = ["dcm_loss", "dml_loss"]
