"""Learning-rate schedules of the papers' recipes (SPEC.md §3), as a pure function of the
(fractional) epoch, so a resumed run sets exactly the same rate."""
from __future__ import annotations

import math

from dcmkd.registry import check_choice

SCHEDULES = ("step", "multistep", "cosine", "constant")


def lr_at(cfg: dict, epoch: float) -> float:
    """Rate at ``epoch`` (0-based; batch b of epoch e is e + b / batches_per_epoch).

    - ``step``: ×gamma every ``step_size`` epochs (ResNet: ÷10 every 60; ImageNet: every 30)
    - ``multistep``: ×gamma at each milestone; milestones ≤ 1 are fractions of the epochs
      (DenseNet: ÷10 at 50% and 75%; WRN: ×0.2 at 60/120/160). Step schedules change at whole
      epochs, as the papers' per-epoch schedulers do.
    - ``cosine``: half a cosine from lr to 0 over the run, per iteration (MobileNetV2)
    - ``warmup_epochs``: linear ramp from 0 before any of them
    """
    s, base, epochs = cfg["schedule"], cfg["optim"]["lr"], cfg["epochs"]
    name = check_choice("schedule", s["name"], SCHEDULES)
    warm = s.get("warmup_epochs", 0) or 0
    if warm and epoch < warm:
        return base * (epoch + 1e-3) / warm
    whole = math.floor(epoch + 1e-9)
    if name == "step":
        return base * s["gamma"] ** (whole // s["step_size"])
    if name == "multistep":
        miles = [m * epochs if m <= 1 else m for m in s["milestones"]]
        return base * s["gamma"] ** sum(1 for m in miles if whole >= m)
    if name == "cosine":
        return 0.5 * base * (1 + math.cos(math.pi * min(epoch, epochs) / epochs))
    return base
