"""Feature losses (FitNets, AT, NST) checked against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from dcmkd.losses import (
    HintRegressor,
    attention_map,
    attention_transfer_loss,
    hint_loss,
    nst_loss,
    nst_loss_multi,
)


def _map(rows) -> torch.Tensor:
    """Nested list [C][H][W] → (1, C, H, W) float tensor."""
    return torch.tensor([rows], dtype=torch.float32)


# ---------------------------------------------------------------------------- FitNets
def test_hint_loss_hand_value():
    s = _map([[[1.0]], [[2.0]]])
    t = _map([[[0.5]], [[-1.0]]])
    # mean over N·C·H·W = 2 elements: ((1 - 0.5)² + (2 + 1)²) / 2
    assert hint_loss(s, t).item() == pytest.approx((0.25 + 9.0) / 2, abs=1e-6)


def test_hint_loss_teacher_no_grad_and_shape_check():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, requires_grad=True)
    hint_loss(s, t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError):
        hint_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def test_hint_regressor_shapes():
    reg = HintRegressor(3, 5)
    x = torch.randn(2, 3, 8, 8)
    assert reg(x).shape == (2, 5, 8, 8)
    assert reg(x, size=(4, 4)).shape == (2, 5, 4, 4)  # pooled down
    assert reg(x, size=(16, 16)).shape == (2, 5, 16, 16)  # bilinear up
    assert reg(x, size=torch.Size([6, 10])).shape == (2, 5, 6, 10)  # mixed → bilinear
    with pytest.raises(ValueError):
        reg(torch.randn(2, 4, 8, 8))
    convs = [m for m in reg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in reg.modules())


def test_hint_regressor_identity_when_allowed():
    reg = HintRegressor(4, 4, always_project=False)
    x = torch.randn(2, 4, 4, 4)
    assert torch.equal(reg(x), x)
    assert len(list(reg.parameters())) == 0
    # 2x2 average pooling of a 4x4 map, done by hand for one entry
    y = reg(x, size=(2, 2))
    assert y[0, 0, 0, 0].item() == pytest.approx(x[0, 0, :2, :2].sum().item() / 4, abs=1e-6)
    # channels differ: a 1×1 conv (4·5 weights, no bias) and BN (5 scales + 5 shifts)
    assert sum(p.numel() for p in HintRegressor(4, 5, always_project=False).parameters()) == 30


def test_hint_regressor_learns_fixed_pair():
    torch.manual_seed(0)
    reg = HintRegressor(3, 5)
    s = torch.randn(8, 3, 8, 8)
    t = torch.randn(8, 5, 4, 4)
    opt = torch.optim.SGD(reg.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = hint_loss(reg(s, size=t.shape[-2:]), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------- AT
A = [[1.0, 2.0], [3.0, 4.0]]  # 1×1×2×2 hand example


def _at_hand_loss() -> float:
    # student Q = A² / ‖A²‖ = (1, 4, 9, 16) / √354; teacher of ones: Q = (1,1,1,1) / 2
    qs = [v / math.sqrt(354.0) for v in (1.0, 4.0, 9.0, 16.0)]
    return sum((q - 0.5) ** 2 for q in qs) / 4


def test_attention_map_hand_values():
    q = attention_map(_map([A]))
    assert q.shape == (1, 4)
    expected = [v / math.sqrt(354.0) for v in (1.0, 4.0, 9.0, 16.0)]
    assert q[0].tolist() == pytest.approx(expected, abs=1e-6)
    # two channels, one negative entry: mean over channels of |a|^p
    two = _map([A, [[-1.0, 0.0], [0.0, 2.0]]])
    # p = 2: ((1+1)/2, (4+0)/2, (9+0)/2, (16+4)/2) = (1, 2, 4.5, 10)
    n2 = math.sqrt(1 + 4 + 4.5**2 + 100)
    assert attention_map(two, p=2)[0].tolist() == pytest.approx([1 / n2, 2 / n2, 4.5 / n2, 10 / n2], abs=1e-6)
    # p = 1: ((1+1)/2, (2+0)/2, (3+0)/2, (4+2)/2) = (1, 1, 1.5, 3)
    n1 = math.sqrt(1 + 1 + 1.5**2 + 9)
    assert attention_map(two, p=1)[0].tolist() == pytest.approx([1 / n1, 1 / n1, 1.5 / n1, 3 / n1], abs=1e-6)


def test_attention_transfer_hand_value():
    s = _map([A])
    t = torch.ones(1, 1, 2, 2)
    hand = _at_hand_loss()
    assert hand > 1e-3
    assert attention_transfer_loss([s], [t]).item() == pytest.approx(hand, abs=1e-7)
    # teacher channel count may differ: 3 channels of ones give the same attention
    assert attention_transfer_loss([s], [torch.ones(1, 3, 2, 2)]).item() == pytest.approx(hand, abs=1e-7)


def test_attention_transfer_identical_is_zero_and_reductions():
    f = torch.randn(2, 4, 5, 5)
    assert attention_transfer_loss([f], [f.clone()]).item() == pytest.approx(0.0, abs=1e-9)
    s, t = _map([A]), torch.ones(1, 1, 2, 2)
    hand = _at_hand_loss()
    pairs_s, pairs_t = [s, f[:1]], [t, f[:1].clone()]
    assert attention_transfer_loss(pairs_s, pairs_t).item() == pytest.approx(hand, abs=1e-7)  # sum
    assert attention_transfer_loss(pairs_s, pairs_t, reduction="mean").item() == \
        pytest.approx(hand / 2, abs=1e-7)
    with pytest.raises(ValueError):
        attention_transfer_loss([s, s], [t])


def test_attention_transfer_spatial_mismatch_pools_larger_map():
    big = _map([A]).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 4×4, constant 2×2 blocks
    ones = torch.ones(1, 1, 2, 2)
    hand = _at_hand_loss()
    assert attention_transfer_loss([big], [ones]).item() == pytest.approx(hand, abs=1e-7)
    assert attention_transfer_loss([ones], [big]).item() == pytest.approx(hand, abs=1e-7)
    assert attention_transfer_loss([big], [_map([A])]).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_transfer_gradients():
    s = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randn(2, 6, 4, 4, requires_grad=True)
    attention_transfer_loss([s], [t]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ---------------------------------------------------------------------------- NST
# sample 0: student 1 channel (3, 4) → (0.6, 0.8); teacher channels (1, 0), (0, 1)
#   k(s,s) = 1;  mean k(t,t) = (1 + 0 + 0 + 1)/4;  mean k(s,t) = (0.6² + 0.8²)/2
NST_0 = 1.0 + (1 + 0 + 0 + 1) / 4 - 2 * ((3 / 5) ** 2 + (4 / 5) ** 2) / 2  # = 0.5
# sample 1: student (1, 0); teacher channels (1, 1), (2, 2) → both (1, 1)/√2
#   k(s,s) = 1;  every k(t,t) = 1;  every k(s,t) = (1/√2)² = 1/2
NST_1 = 1.0 + 1.0 - 2 * (1 / math.sqrt(2)) ** 2  # = 1.0


def _nst_pair():
    s = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 0.0]]]])  # (2, 1, 1, 2)
    t = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 1.0]], [[2.0, 2.0]]]])  # (2, 2, 1, 2)
    return s, t


def test_nst_hand_value():
    s, t = _nst_pair()
    assert NST_0 == pytest.approx(0.5) and NST_1 == pytest.approx(1.0)
    assert nst_loss(s[:1], t[:1]).item() == pytest.approx(NST_0, abs=1e-6)
    assert nst_loss(s, t).item() == pytest.approx((NST_0 + NST_1) / 2, abs=1e-6)  # batch mean
    # scale invariance: each channel is L2-normalised
    assert nst_loss(7.0 * s, 0.1 * t).item() == pytest.approx((NST_0 + NST_1) / 2, abs=1e-6)


def test_nst_kernel_offset_hand_value():
    s, t = _nst_pair()
    # c = 1, d = 2 on sample 0: k(x, y) = (xᵀy + 1)², with sᵀt1 = 0.6 and sᵀt2 = 0.8
    kss = (1.0 + 1.0) ** 2
    ktt = ((1 + 1) ** 2 + (0 + 1) ** 2 + (0 + 1) ** 2 + (1 + 1) ** 2) / 4
    kst = ((0.6 + 1) ** 2 + (0.8 + 1) ** 2) / 2
    assert nst_loss(s[:1], t[:1], c=1.0).item() == pytest.approx(kss + ktt - 2 * kst, abs=1e-5)


def test_nst_identical_is_zero_and_spatial_mismatch():
    f = torch.randn(3, 4, 5, 5)
    assert nst_loss(f, f.clone()).item() == pytest.approx(0.0, abs=1e-5)
    # student of width 4 pooled to width 2: (3, 3, 4, 4) → (3, 4)
    s_wide = torch.tensor([[[[3.0, 3.0, 4.0, 4.0]]]])
    _, t = _nst_pair()
    assert nst_loss(s_wide, t[:1]).item() == pytest.approx(NST_0, abs=1e-6)


def test_nst_multi_and_gradients():
    s, t = _nst_pair()
    f = torch.randn(2, 3, 2, 2)
    both = (NST_0 + NST_1) / 2
    assert nst_loss_multi([s, f], [t, f.clone()]).item() == pytest.approx(both, abs=1e-5)  # sum
    assert nst_loss_multi([s, f], [t, f.clone()], reduction="mean").item() == \
        pytest.approx(both / 2, abs=1e-5)
    sg = torch.randn(2, 3, 4, 4, requires_grad=True)
    tg = torch.randn(2, 5, 4, 4, requires_grad=True)
    nst_loss_multi([sg], [tg]).backward()
    assert sg.grad is not None and sg.grad.abs().sum() > 0
    assert tg.grad is None


def test_feature_losses_upcast_low_precision():
    s = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    t = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    for value in (hint_loss(s, t), attention_transfer_loss([s], [t]), nst_loss(s, t)):
        assert value.dtype == torch.float32
