"""A run's ``test_error.png``: test error per evaluated epoch for each network (DCM paper
Fig. 2 style), beside each network's training loss per epoch."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: a network's loss term in an epoch record: ``train/net0/ce`` (accuracies are one level deeper,
#: ``train/net0/C1/acc``)
LOSS_TERM = re.compile(r"train/net(\d+)/[^/]+")


def training_loss(record: dict[str, Any], n: int) -> float | None:
    """Network ``n``'s training loss in an epoch record: the sum of its logged loss terms
    (each a mean over the epoch's samples; the sum the loop watches for divergence). None
    when the record holds none."""
    terms = [v for k, v in record.items() if isinstance(v, (int, float))
             and (m := LOSS_TERM.fullmatch(k)) and int(m.group(1)) == n
             and not k.endswith("/acc")]
    return float(sum(terms)) if terms else None


def plot_test_error(history: list[dict], nets: list[str], path: str | Path,
                    task: Any = None) -> None:
    """Two panels: each network's test metric at the epochs that were evaluated (points joined
    by lines, so a run evaluated once, ``eval_every`` > 1, still shows its point) and its
    training loss at every epoch of ``history``. ``task``: reads each network's headline metric
    (:mod:`dcmkd.tasks`; default the classification top-1 error of C1)."""
    def metric(r: dict, n: int) -> Any:
        return r.get(f"test/net{n}/C1/top1") if task is None else task.network_metric(r, n)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (test_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for n, name in enumerate(nets):
        evaluated = [(r["epoch"], metric(r, n)) for r in history if metric(r, n) is not None]
        if evaluated:
            test_ax.plot(*zip(*evaluated), marker="o", markersize=4, label=f"net{n} {name}")
        losses = [(r["epoch"], training_loss(r, n)) for r in history
                  if training_loss(r, n) is not None]
        if losses:
            loss_ax.plot(*zip(*losses), marker="o", markersize=3, label=f"net{n} {name}")
    test_ax.set_ylabel("test top-1 error (%)" if task is None or task.name == "classification"
                       else task.headline.replace("_", " "))
    loss_ax.set_ylabel("training loss (sum of the logged terms)")
    for ax in (test_ax, loss_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
