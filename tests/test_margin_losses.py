"""Face classification heads: ArcFace / CosFace logits against hand-computed numbers."""
from __future__ import annotations

import math

import pytest
import torch

from dcmkd.losses.margin import MarginHead, arcface_logits, cosface_logits


def test_arcface_target_gets_the_angular_margin():
    cos = torch.tensor([[0.5, 0.1, -0.3]])
    out = arcface_logits(cos, torch.tensor([0]), s=64.0, m=0.5)
    # theta = 60 deg, m = 0.5 rad = 28.65 deg: 64 cos(88.65 deg) = 1.5102
    assert out[0, 0].item() == pytest.approx(64 * math.cos(math.radians(60) + 0.5), abs=1e-4)
    assert out[0, 0].item() == pytest.approx(1.5102, abs=1e-4)
    assert out[0, 1:].tolist() == pytest.approx([6.4, -19.2], abs=1e-5)  # others: s cos


def test_arcface_fallback_past_pi_minus_m():
    # cos = -0.95: theta = 161.8 deg, theta + m > 180 deg -> cos - m sin(pi - m) (insightface)
    cos = torch.tensor([[-0.95, 0.2], [-0.87, 0.2]])
    out = arcface_logits(cos, torch.tensor([0, 0]), s=64.0, m=0.5)
    assert out[0, 0].item() == pytest.approx(64 * (-0.95 - 0.5 * math.sin(0.5)), abs=1e-4)
    assert out[0, 0].item() == pytest.approx(-76.1414, abs=1e-3)
    # -0.87 > cos(pi - 0.5) = -0.8776: still the true margin
    assert out[1, 0].item() == pytest.approx(64 * math.cos(math.acos(-0.87) + 0.5), abs=1e-4)


def test_arcface_easy_margin_leaves_obtuse_angles_alone():
    cos = torch.tensor([[-0.2, 0.3], [0.5, 0.3]])
    out = arcface_logits(cos, torch.tensor([0, 0]), s=10.0, m=0.5, easy_margin=True)
    assert out[0, 0].item() == pytest.approx(-2.0, abs=1e-5)
    assert out[1, 0].item() == pytest.approx(10 * math.cos(math.pi / 3 + 0.5), abs=1e-5)


def test_cosface_subtracts_the_cosine_margin():
    cos = torch.tensor([[0.5, 0.1], [0.2, 0.9]])
    out = cosface_logits(cos, torch.tensor([0, 1]), s=64.0, m=0.35)
    assert out.tolist() == [pytest.approx([9.6, 6.4], abs=1e-4),
                            pytest.approx([12.8, 35.2], abs=1e-4)]


def test_margin_head_defaults_train_and_eval_logits():
    head = MarginHead(2, 2, kind="arcface")
    assert (head.s, head.m) == (64.0, 0.5)
    assert (MarginHead(2, 2, kind="cosface").s, MarginHead(2, 2, kind="cosface").m) == (64.0, 0.35)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 5.0]]))  # normalised: the axes
    emb = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8)
    assert head(emb).tolist()[0] == pytest.approx([38.4, 51.2], abs=1e-4)  # no margin at eval
    train = head(emb, torch.tensor([0]))
    assert train[0, 0].item() == pytest.approx(64 * (0.6 * math.cos(0.5) - 0.8 * math.sin(0.5)),
                                               abs=1e-4)
    assert train[0, 1].item() == pytest.approx(51.2, abs=1e-4)


def test_softmax_head_is_a_linear_layer_with_bias():
    head = MarginHead(4, 3, kind="softmax")
    x = torch.randn(5, 4)
    assert torch.equal(head(x), head.fc(x))
    assert torch.equal(head(x, torch.zeros(5, dtype=torch.long)), head.fc(x))
    assert head.fc.bias is not None


def test_gradient_is_finite_when_embedding_equals_class_weight():
    head = MarginHead(3, 2, kind="arcface")
    emb = head.weight.detach()[:1].clone().requires_grad_(True)  # cos = 1 exactly
    loss = torch.nn.functional.cross_entropy(head(emb, torch.tensor([0])), torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_bad_head_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown face head 'sphereface'"):
        MarginHead(4, 3, kind="sphereface")
    with pytest.raises(ValueError, match="embedding_dim must be a positive integer"):
        MarginHead(0, 3)
    head = MarginHead(4, 3)
    with pytest.raises(ValueError, match=r"expects embeddings \[batch, 4\], got \(2, 5\)"):
        head(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.2, got 0\.\.3"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="margin m must be below pi"):
        arcface_logits(torch.zeros(1, 2), torch.tensor([0]), m=4.0)
