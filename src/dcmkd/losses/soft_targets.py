"""Soft-target (logit) distillation losses: KD (Hinton), DML and the DCM pairwise term.

Notation follows dcm-paper.md §3.1: ``z`` are logits, ``P = softmax(z / T)`` (Eq. 3), the batch
has ``N`` samples and ``M`` classes. In every function the *teacher* side is the target: it is
detached inside the function, so only the student receives gradient (DCM Algorithm 1, step 4).

All losses are computed in float32 (inputs in bf16/fp16 are upcast first) with ``log_softmax``
for numerical stability, and are returned as float32 scalars.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy", "kl_divergence", "hinton_kd_loss"]


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"logits must be (N, M), got student shape {tuple(student_logits.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student/teacher logits shapes differ: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _log_probs(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """float32 ``log P_s`` (with grad) and ``log P_t`` (detached), both softened by ``T`` (Eq. 3)."""
    _check_logits(student_logits, teacher_logits, temperature)
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return log_ps, log_pt


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    t2_scaling: bool = False,
) -> Tensor:
    """Soft cross-entropy ``L_kd`` of DCM Eq. 2 with the softening of Eq. 3.

    ``L = -(1/N) Σ_n Σ_m P_t^m(x_n) log P_s^m(x_n)``, ``P = softmax(z / T)``; the teacher target is
    detached. With ``t2_scaling=True`` the value is multiplied by ``T²`` (Hinton et al. 2015, to
    keep gradient magnitudes comparable across temperatures); off by default, as in the DCM paper
    (T = 1 there, where the factor is 1 anyway).
    """
    log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
    loss = -(log_pt.exp() * log_ps).sum(dim=1).mean()
    if t2_scaling:
        loss = loss * (temperature**2)
    return loss


def kl_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    t2_scaling: bool = False,
) -> Tensor:
    """KL divergence ``L_dml`` of DCM Eq. 5 (DML): ``(1/N) Σ_n Σ_m P_t log(P_t / P_s)``.

    Equals :func:`soft_cross_entropy` minus the (detached) teacher entropy, so its gradient with
    respect to the student is identical (DCM §3.1: "KL divergence is equivalent to cross entropy
    from the perspective of gradients calculation"), while a perfect match reads 0. Batch mean;
    ``t2_scaling`` multiplies by ``T²`` as in :func:`soft_cross_entropy`.
    """
    log_ps, log_pt = _log_probs(student_logits, teacher_logits, temperature)
    loss = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1).mean()
    if t2_scaling:
        loss = loss * (temperature**2)
    return loss


def hinton_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    weight: float,
    temperature: float = 4.0,
) -> dict[str, Tensor]:
    """Hinton KD as used by the SSKD baselines: ``L = CE(z_s, y) + λ · L_kd`` (DCM Eq. 1).

    **Reading** (SPEC §4; SSKD "Settings for Competitors", T = 4, λ = 10 on CIFAR-100 and 15 on
    ImageNet): ``L_kd = T² · KL(P_t ‖ P_s)`` with ``P = softmax(z / T)`` and batch mean, i.e. the
    common reading of Hinton et al. (2015), who scale the soft term by ``T²``. The SSKD paper's
    footnote (α = 0.2 vs 0.8 ≡ λ = 4) shows its λ is the ratio of the soft weight to the hard
    weight, which is the form ``CE + λ·KD`` used here. The CE term uses the unsoftened logits.

    Returns ``{"ce": CE, "kd": λ · L_kd}`` (float32 scalars); the total loss is their sum.
    """
    if targets.dim() != 1 or targets.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"targets must be (N,) class indices, got {tuple(targets.shape)} for logits "
            f"{tuple(student_logits.shape)}"
        )
    ce = F.cross_entropy(student_logits.float(), targets)
    kd = kl_divergence(student_logits, teacher_logits, temperature=temperature, t2_scaling=True)
    return {"ce": ce, "kd": kd * weight}
