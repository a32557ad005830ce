"""The link-matrix loss of DCM Eq. 6–9 against hand-computed values, and its bookkeeping."""
from __future__ import annotations

import math

import pytest
import torch

from dcmkd.losses.mutual import LinkMatrix, mutual_distillation_loss

LN3 = math.log(3)


def two_by_two():
    """Net A: C1 = [0, ln3] (p = 1/4, 3/4), C2 = [0, 0]; net B: C1 = [ln3, 0], C2 = [0, 0]."""
    a = [torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]])]
    b = [torch.tensor([[LN3, 0.0]]), torch.tensor([[0.0, 0.0]])]
    return [a, b], torch.tensor([1])


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def xent(p, q):
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def test_dense_loss_matches_hand_computation():
    logits, y = two_by_two()
    out = mutual_distillation_loss(logits, y, LinkMatrix.build([2, 2], "dense"))
    pa1, pb1, half = [0.25, 0.75], [0.75, 0.25], [0.5, 0.5]
    a = out.per_network[0]
    assert a["ce"].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert a["ds"].item() == pytest.approx(math.log(2), abs=1e-6)
    # Eq. 8: B.C1 → A.C1 and B.C2 → A.C2
    assert a["dcm1"].item() == pytest.approx(kl(pb1, pa1) + kl(half, half), abs=1e-6)
    assert a["dcm1"].item() == pytest.approx(0.5 * LN3, abs=1e-6)
    # Eq. 9: B.C1 → A.C2 and B.C2 → A.C1
    assert a["dcm2"].item() == pytest.approx(kl(pb1, half) + kl(half, pa1), abs=1e-6)
    b = out.per_network[1]
    assert b["dcm2"].item() == pytest.approx(kl(pa1, half) + kl(half, pb1), abs=1e-6)
    assert out.total(0).item() == pytest.approx(sum(v.item() for v in a.values()))


def test_cross_entropy_form_of_eq2_and_weights():
    logits, y = two_by_two()
    out = mutual_distillation_loss(logits, y, LinkMatrix.build([2, 2], "dense"), alpha=0.5,
                                   beta=2.0, gamma=3.0, divergence="ce")
    a = out.per_network[0]
    pa1, pb1, half = [0.25, 0.75], [0.75, 0.25], [0.5, 0.5]
    assert a["ds"].item() == pytest.approx(0.5 * math.log(2), abs=1e-6)
    assert a["dcm1"].item() == pytest.approx(2.0 * (xent(pb1, pa1) + xent(half, half)), abs=1e-5)
    assert a["dcm2"].item() == pytest.approx(3.0 * (xent(pb1, half) + xent(half, pa1)), abs=1e-5)


def test_temperature_softens_both_sides_and_t2_scaling():
    logits, y = two_by_two()
    links = LinkMatrix.build([2, 2], "final")
    t = 2.0
    pa = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]  # softmax([0, ln3] / 2)
    pb = pa[::-1]
    plain = mutual_distillation_loss(logits, y, links, temperature=t)
    scaled = mutual_distillation_loss(logits, y, links, temperature=t, t2_scaling=True)
    assert plain.per_network[0]["dcm1"].item() == pytest.approx(kl(pb, pa), abs=1e-6)
    assert scaled.per_network[0]["dcm1"].item() == pytest.approx(4 * kl(pb, pa), abs=1e-5)
    assert "dcm2" not in plain.per_network[0]  # final-only links: no different-staged term


def test_kl_and_cross_entropy_forms_have_the_same_gradient():
    torch.manual_seed(0)
    za = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    zb = [torch.randn(4, 5) for _ in range(3)]
    y = torch.randint(0, 5, (4,))
    grads = []
    for div in ("kl", "ce"):
        out = mutual_distillation_loss([za, zb], y, LinkMatrix.build([3, 3]), divergence=div)
        grads.append(torch.autograd.grad(out.total(0), za))
    for g1, g2 in zip(*grads):
        assert torch.allclose(g1, g2, atol=1e-6)


def test_term_bookkeeping_two_networks_three_classifiers():
    """6 CE terms and 18 distillation terms (6 same-staged, 12 different-staged), as in the
    official code; DCM-1 and DCM-2 split them."""
    dense, same, cross = (LinkMatrix.build([3, 3], p) for p in ("dense", "same", "cross"))
    assert dense.count() == {"same": 6, "cross": 12}
    assert same.count() == {"same": 6, "cross": 0}
    assert cross.count() == {"same": 0, "cross": 12}
    assert torch.equal(dense.links, same.links | cross.links)
    assert not (same.links & cross.links).any()
    torch.manual_seed(1)
    logits = [[torch.randn(3, 4) for _ in range(3)] for _ in range(2)]
    y = torch.randint(0, 4, (3,))
    out = mutual_distillation_loss(logits, y, dense)
    assert out.ce.numel() == 6 and int((out.pairwise != 0).sum()) == 18
    o1 = mutual_distillation_loss(logits, y, same).per_network[1]
    o2 = mutual_distillation_loss(logits, y, cross).per_network[1]
    assert torch.allclose(out.per_network[1]["dcm1"], o1["dcm1"])
    assert torch.allclose(out.per_network[1]["dcm2"], o2["dcm2"])


def test_three_networks_and_no_link_within_a_network():
    links = LinkMatrix.build([3, 3, 3])
    assert links.count() == {"same": 18, "cross": 36}  # per network: 2 peers × (3 + 6)
    nodes = links.nodes
    for a, b in links.links.nonzero().tolist():
        assert nodes[a][0] != nodes[b][0]


def test_frozen_network_receives_no_link_and_mismatch_errors():
    links = LinkMatrix.build([1, 1], "final", frozen=[0])
    assert links.links.tolist() == [[False, True], [False, False]]
    with pytest.raises(ValueError, match="classifiers per network"):
        mutual_distillation_loss([[torch.zeros(1, 2)], [torch.zeros(1, 2)]], torch.tensor([0]),
                                 LinkMatrix.build([2, 2]))


def test_low_precision_logits_are_computed_in_float32():
    logits, y = two_by_two()
    half = [[z.bfloat16() for z in net] for net in logits]
    out = mutual_distillation_loss(half, y, LinkMatrix.build([2, 2]))
    assert out.per_network[0]["dcm1"].dtype == torch.float32
