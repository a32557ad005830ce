"""Soft-target losses checked against hand-computed values (DCM Eq. 2, 3, 5; Hinton KD)."""
from __future__ import annotations

import math

import pytest
import torch

from dcmkd.losses import hinton_kd_loss, kl_divergence, soft_cross_entropy

# Logits chosen as logs of simple probabilities, so softmax(z) is known exactly:
#   student row 0: uniform (1/3, 1/3, 1/3)     row 1: (1/4, 1/2, 1/4)
#   teacher row 0: (1/4, 1/4, 1/2)             row 1: uniform
PS = [[1 / 3, 1 / 3, 1 / 3], [1 / 4, 1 / 2, 1 / 4]]
PT = [[1 / 4, 1 / 4, 1 / 2], [1 / 3, 1 / 3, 1 / 3]]
S_LOGITS = [[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0]]
T_LOGITS = [[0.0, 0.0, math.log(2.0)], [0.0, 0.0, 0.0]]

# -(1/N) Σ_n Σ_m p_t log p_s, N = 2
CE_HAND = -0.5 * (
    (1 / 4 + 1 / 4 + 1 / 2) * math.log(1 / 3)
    + (1 / 3) * (math.log(1 / 4) + math.log(1 / 2) + math.log(1 / 4))
)
# (1/N) Σ_n Σ_m p_t log(p_t / p_s)
KL_HAND = 0.5 * (
    2 * (1 / 4) * math.log((1 / 4) / (1 / 3)) + (1 / 2) * math.log((1 / 2) / (1 / 3))
    + (1 / 3) * (math.log((1 / 3) / (1 / 4)) + math.log((1 / 3) / (1 / 2)) + math.log((1 / 3) / (1 / 4)))
)


def _t(rows, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor([[v * scale for v in r] for r in rows], requires_grad=requires_grad)


def test_hand_values_are_consistent():
    # sanity of the hand arithmetic itself: CE = KL + mean teacher entropy
    h0 = -(2 * (1 / 4) * math.log(1 / 4) + (1 / 2) * math.log(1 / 2))
    h1 = math.log(3.0)
    assert CE_HAND == pytest.approx(KL_HAND + (h0 + h1) / 2, abs=1e-12)


def test_soft_cross_entropy_hand_value():
    loss = soft_cross_entropy(_t(S_LOGITS), _t(T_LOGITS))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(CE_HAND, abs=1e-6)


def test_kl_divergence_hand_value():
    loss = kl_divergence(_t(S_LOGITS), _t(T_LOGITS))
    assert loss.item() == pytest.approx(KL_HAND, abs=1e-6)
    assert loss.item() != pytest.approx(CE_HAND, abs=1e-3)


@pytest.mark.parametrize("fn, hand", [(soft_cross_entropy, CE_HAND), (kl_divergence, KL_HAND)])
def test_temperature_and_t2_scaling(fn, hand):
    T = 2.0
    # logits scaled by T and softened by T give the same probabilities
    plain = fn(_t(S_LOGITS, T), _t(T_LOGITS, T), temperature=T)
    scaled = fn(_t(S_LOGITS, T), _t(T_LOGITS, T), temperature=T, t2_scaling=True)
    assert plain.item() == pytest.approx(hand, abs=1e-6)
    assert scaled.item() == pytest.approx(T * T * hand, abs=1e-5)
    # without the softening the value differs
    assert fn(_t(S_LOGITS, T), _t(T_LOGITS, T)).item() != pytest.approx(hand, abs=1e-3)


def test_kl_of_identical_logits_is_zero():
    z = torch.randn(5, 7)
    assert kl_divergence(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_divergence(z, z.clone(), temperature=3.0, t2_scaling=True).item() == pytest.approx(0.0, abs=1e-5)
    # the soft CE of identical logits is the entropy, not 0
    assert soft_cross_entropy(z, z.clone()).item() > 0.1


def test_student_gradient_hand_value():
    # d/dz_s of -(1/N) Σ p_t log softmax(z_s/T) is (p_s - p_t) / (N T)
    T = 1.0
    s = _t(S_LOGITS, requires_grad=True)
    soft_cross_entropy(s, _t(T_LOGITS), temperature=T).backward()
    expected = torch.tensor([[(PS[n][m] - PT[n][m]) / (2 * T) for m in range(3)] for n in range(2)])
    torch.testing.assert_close(s.grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_ce_and_kl_have_identical_student_gradients(T):
    g = torch.Generator().manual_seed(0)
    s0, t0 = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g) * 3
    s1 = s0.clone().requires_grad_(True)
    s2 = s0.clone().requires_grad_(True)
    soft_cross_entropy(s1, t0, temperature=T, t2_scaling=True).backward()
    kl_divergence(s2, t0, temperature=T, t2_scaling=True).backward()
    assert s1.grad.abs().sum() > 0
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("fn", [soft_cross_entropy, kl_divergence])
def test_teacher_receives_no_gradient(fn):
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    fn(s, t, temperature=2.0).backward()
    assert s.grad is not None
    assert t.grad is None


def test_low_precision_inputs_are_upcast():
    s = _t(S_LOGITS).to(torch.bfloat16).requires_grad_(True)
    t = _t(T_LOGITS).to(torch.bfloat16)
    loss = soft_cross_entropy(s, t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(CE_HAND, abs=1e-2)
    loss.backward()
    assert s.grad is not None and s.grad.dtype == torch.bfloat16
    assert kl_divergence(s.half(), t.half()).dtype == torch.float32


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


def test_hinton_kd_loss_hand_value():
    T, lam = 4.0, 10.0
    s = _t(S_LOGITS, T, requires_grad=True)  # softmax(s / 4) = PS
    t = _t(T_LOGITS, T, requires_grad=True)  # softmax(t / 4) = PT
    y = torch.tensor([2, 1])
    out = hinton_kd_loss(s, t, y, weight=lam, temperature=T)
    assert set(out) == {"ce", "kd"}
    # hard CE on the unsoftened logits 4·log p: softmax ∝ p^4
    # row 0 uniform → -log(1/3); row 1: (1/2)^4 / ((1/2)^4 + 2·(1/4)^4) = 8/9
    ce_hand = 0.5 * (-math.log(1 / 3) - math.log((1 / 16) / (1 / 16 + 2 / 256)))
    assert out["ce"].item() == pytest.approx(ce_hand, abs=1e-5)
    # λ · T² · KL(PT ‖ PS)
    assert out["kd"].item() == pytest.approx(lam * T * T * KL_HAND, abs=1e-4)
    assert out["ce"].dtype == out["kd"].dtype == torch.float32
    (out["ce"] + out["kd"]).backward()
    assert s.grad is not None and t.grad is None


def test_hinton_kd_weight_is_linear():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    a = hinton_kd_loss(s, t, y, weight=1.0)
    b = hinton_kd_loss(s, t, y, weight=15.0)
    assert b["kd"].item() == pytest.approx(15.0 * a["kd"].item(), rel=1e-5)
    assert b["ce"].item() == pytest.approx(a["ce"].item(), rel=1e-6)
