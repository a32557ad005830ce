"""Symmetric label noise (DCM paper Table 7)."""
from __future__ import annotations

import pytest
import torch

from dcmkd.data import corrupt_labels


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_exact_count_always_wrong_rest_untouched(fraction):
    labels = torch.arange(1000) % 10
    noisy, idx = corrupt_labels(labels, fraction, 10, seed=0)
    assert len(idx) == round(fraction * 1000) and len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, idx.sort().values)
    assert (noisy[idx] != labels[idx]).all()
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(noisy[untouched], labels[untouched])
    assert (noisy != labels).sum() == len(idx)
    assert noisy.min() >= 0 and noisy.max() < 10 and noisy.dtype == torch.int64


def test_deterministic_by_seed_and_input_untouched():
    labels = torch.randint(0, 100, (500,), generator=torch.Generator().manual_seed(0))
    before = labels.clone()
    a = corrupt_labels(labels, 0.3, 100, seed=5)
    b = corrupt_labels(labels.tolist(), 0.3, 100, seed=5)
    c = corrupt_labels(labels, 0.3, 100, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert torch.equal(labels, before)


def test_wrong_labels_are_uniform_over_the_other_classes():
    labels = torch.zeros(20000, dtype=torch.int64)
    noisy, idx = corrupt_labels(labels, 1.0, 5, seed=1)
    counts = torch.bincount(noisy, minlength=5)
    assert counts[0] == 0 and len(idx) == 20000
    assert ((counts[1:].float() / 20000 - 0.25).abs() < 0.02).all()


def test_edge_cases():
    labels = torch.tensor([0, 1, 1, 0])
    noisy, idx = corrupt_labels(labels, 0.0, 2, seed=0)
    assert torch.equal(noisy, labels) and len(idx) == 0
    noisy, idx = corrupt_labels(labels, 1.0, 2, seed=0)
    assert torch.equal(noisy, 1 - labels)
    assert len(corrupt_labels(torch.zeros(5, dtype=torch.int64), 0.5, 3, 0)[1]) == 3  # 2.5 -> 3
    with pytest.raises(ValueError):
        corrupt_labels(labels, 1.5, 2, 0)
    with pytest.raises(ValueError):
        corrupt_labels(torch.tensor([0, 7]), 0.5, 3, 0)
