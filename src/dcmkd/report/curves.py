"""Test-error curves over seeds: the mean per epoch and the range (min..max) as a band
(DCM paper Fig. 2, with the spread of the seeds made visible); with the runs' training losses,
a second row of panels shows them the same way. Each evaluated epoch is a point: a run
evaluated once (``eval_every`` > 1, a smoke reproduction) still shows it."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dcmkd.report.results import CellStats  # noqa: E402


Curves = Sequence[Sequence[tuple[int, float]]]   # one (epoch, value) list per seed


def _draw(ax: plt.Axes, curves: Curves, label: str) -> None:
    """The mean over seeds at the epochs every seed has (runs may evaluate every N epochs),
    as points joined by a line, and the range over seeds as a band."""
    common = sorted(set.intersection(*(set(e for e, _ in c) for c in curves))) if curves else []
    if not common:
        return
    values = [[dict(c)[e] for e in common] for c in curves]
    mean = [sum(v) / len(v) for v in zip(*values)]
    seeds = f"{len(values)} seed" + ("s" if len(values) > 1 else "")
    line, = ax.plot(common, mean, marker="o", markersize=4, label=f"{label} ({seeds})")
    if len(values) > 1:
        ax.fill_between(common, [min(v) for v in zip(*values)], [max(v) for v in zip(*values)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def plot_row_curves(stats: Sequence[CellStats], networks: Sequence[str], title: str,
                    path: str | Path,
                    losses: Mapping[tuple[str, str], Curves] | None = None,
                    ylabel: str = "test top-1 error (%)") -> None:
    """One panel per reported network, one line per column (method), band = range over seeds.
    ``losses`` (``(column, network)`` → each seed's ``(epoch, training loss)`` list, e.g. from
    :func:`dcmkd.engine.plots.training_loss` of its metrics) adds a row of training-loss panels
    below. ``ylabel``: what the curves are (a task table's first metric)."""
    panels = [n for n in networks if any(s.network == n for s in stats)]
    rows = 2 if losses else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(5 * len(panels), 3.6 * rows),
                             squeeze=False, sharex="col")
    for i, net in enumerate(panels):
        ax = axes[0][i]
        for s in (s for s in stats if s.network == net):
            _draw(ax, s.curves, s.column)
        model = next((s.model for s in stats if s.network == net and s.model), "")
        ax.set_title(f"{net}: {model}" if model else net)
        ax.set_ylabel(ylabel)
        if losses:
            for s in (s for s in stats if s.network == net):
                _draw(axes[1][i], losses.get((s.column, net)) or [], s.column)
            axes[1][i].set_ylabel("training loss (sum of the logged terms)")
        for a in (axes[r][i] for r in range(rows)):
            a.set_xlabel("epoch")
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
            a.grid(alpha=0.3)
            if a.lines:
                a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
