"""Seeded, stratified selection of sample indices (demo splits and quick-protocol subsets)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def stratified_indices(labels: torch.Tensor | np.ndarray | Sequence[int], count: int, seed: int
                       ) -> torch.Tensor:
    """Sorted int64 indices of ``count`` samples, each class in proportion to its share.

    Per-class counts are rounded by the largest-remainder rule (ties: lower class first) so they
    sum to ``count``; the members of each class are drawn without replacement with
    ``numpy.random.default_rng(seed)``, class by class in sorted class order. A pure function of
    its arguments, independent of torch's and numpy's global random state.
    """
    y = np.asarray(labels, dtype=np.int64)
    if not 0 <= count <= len(y):
        raise ValueError(f"cannot select {count} of {len(y)} samples")
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(y, return_counts=True)
    exact = sizes * (count / max(len(y), 1))
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: count - int(take.sum())]] += 1
    chosen = [rng.choice(np.flatnonzero(y == c), size=int(k), replace=False)
              for c, k in zip(classes, take)]
    out = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    return torch.from_numpy(out.astype(np.int64))
