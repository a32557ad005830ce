"""Classification metrics."""
from __future__ import annotations

import torch


def topk_errors(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                ) -> tuple[float, ...]:
    """Number of samples whose target is not among the top-k predictions, for each k (k is
    capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(targets[:, None])
    return tuple(float(len(targets) - hit[:, :min(k, maxk)].any(1).sum().item()) for k in ks)
