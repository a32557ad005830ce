"""Symmetric label noise for the noisy-label experiments (DCM paper Table 7).

A fixed fraction of training labels is chosen once, before training, and each chosen label is
replaced by a label drawn uniformly from the *other* classes (never the original one).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def corrupt_labels(labels: torch.Tensor | Sequence[int], fraction: float, num_classes: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(noisy labels, sorted corrupted indices)``, both int64, as a pure function of
    the arguments.

    Exactly ``round(fraction · N)`` indices (halves rounded up) are drawn without replacement
    with a CPU generator seeded by ``seed``; each gets ``(y + k) mod num_classes`` with ``k``
    uniform in ``1..num_classes-1``, i.e. a uniformly random wrong label.
    """
    y = torch.as_tensor(labels, dtype=torch.int64).cpu()
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label-noise fraction must be in [0, 1], got {fraction}")
    if num_classes < 2 and fraction > 0:
        raise ValueError("label noise needs at least two classes")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    count = int(math.floor(fraction * len(y) + 0.5))
    g = torch.Generator().manual_seed(int(seed))
    index = torch.randperm(len(y), generator=g)[:count].sort().values
    shift = torch.randint(1, max(num_classes, 2), (count,), generator=g)
    noisy = y.clone()
    noisy[index] = (y[index] + shift) % num_classes
    return noisy, index
