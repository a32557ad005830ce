"""dcm_loss / dml_loss for plain training loops: values against a hand computation of DCM
Eq. 6–9 on tiny logits, and the detach rule (no gradient reaches a peer's logits)."""
from __future__ import annotations

import math

import pytest
import torch

from dcmkd import dcm_loss, dml_loss
from dcmkd.registry import UnknownNameError

Y = torch.tensor([0, 2])
# network n, classifier c: [batch 2, 3 classes]
Z = [[torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.2, 0.1]]),
      torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 1.0]])],
     [torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]]),
      torch.tensor([[0.3, -0.2, 0.9], [1.5, 0.0, -0.5]])]]


def softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def ce(z, y):
    return sum(-math.log(softmax(r)[k]) for r, k in zip(z.tolist(), y.tolist())) / len(y)


def kl(target, student, t=1.0):
    """KL(P_target ‖ P_student), batch mean."""
    out = 0.0
    for a, b in zip(target.tolist(), student.tolist()):
        p, q = softmax(a, t), softmax(b, t)
        out += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return out / len(target)


def expected(n, same=True, cross=True, alpha=1.0, beta=1.0, gamma=1.0, t=1.0):
    m = 1 - n
    total = ce(Z[n][0], Y) + alpha * ce(Z[n][1], Y)
    for i in range(2):
        for j in range(2):
            if i == j and same:
                total += beta * kl(Z[m][i], Z[n][j], t)
            if i != j and cross:
                total += gamma * kl(Z[m][i], Z[n][j], t)
    return total


@pytest.mark.parametrize("pattern,same,cross", [("dense", True, True), ("same", True, False),
                                                ("cross", False, True)])
def test_values_match_the_hand_computation(pattern, same, cross):
    got = dcm_loss(Z, Y, pattern)
    for n in range(2):
        assert got[n].item() == pytest.approx(expected(n, same, cross), rel=1e-5)


def test_weights_and_temperature():
    got = dcm_loss(Z, Y, alpha=0.5, beta=2.0, gamma=0.25, temperature=2.0)
    for n in range(2):
        want = expected(n, alpha=0.5, beta=2.0, gamma=0.25, t=2.0)
        assert got[n].item() == pytest.approx(want, rel=1e-5)


def test_dml_kd_and_single_tensors():
    want = [ce(Z[n][0], Y) + kl(Z[1 - n][0], Z[n][0]) for n in range(2)]
    for got in (dml_loss([Z[0][0], Z[1][0]], Y), dml_loss(Z, Y),  # lists: C1 is used
                dcm_loss([Z[0][0], Z[1][0]], Y, "final")):
        assert [v.item() for v in got] == pytest.approx(want, rel=1e-5)
    # a frozen teacher (network 0) only teaches: KD
    kd = dcm_loss([Z[0][0], Z[1][0]], Y, "final", frozen=[0])
    assert kd[0].item() == pytest.approx(ce(Z[0][0], Y), rel=1e-5)
    assert kd[1].item() == pytest.approx(want[1], rel=1e-5)


def test_no_gradient_reaches_the_peers_logits():
    logits = [[z.clone().requires_grad_() for z in net] for net in Z]
    losses = dcm_loss(logits, Y)
    own = torch.autograd.grad(losses[0], logits[0] + logits[1], allow_unused=True,
                              retain_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in own[:2])
    assert own[2] is None and own[3] is None  # network 1's logits are detached targets
    # so the sum's gradient w.r.t. network 1 is that of its own loss alone
    total = torch.autograd.grad(sum(losses), logits[1], retain_graph=True)
    alone = torch.autograd.grad(losses[1], logits[1])
    for a, b in zip(total, alone):
        assert torch.allclose(a, b)


def test_three_networks_and_unknown_pattern():
    three = [Z[0], Z[1], [Z[0][1], Z[1][0]]]
    got = dcm_loss(three, Y, "same")
    # network 0 learns from both peers: the same-staged terms add up
    want = ce(Z[0][0], Y) + ce(Z[0][1], Y) + kl(Z[1][0], Z[0][0]) + kl(Z[1][1], Z[0][1]) + \
        kl(Z[0][1], Z[0][0]) + kl(Z[1][0], Z[0][1])
    assert got[0].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(UnknownNameError, match="did you mean dense"):
        dcm_loss(Z, Y, "denser")
