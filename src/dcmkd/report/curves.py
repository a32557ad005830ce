"""Test-error curves over seeds: the mean per epoch and the range (min..max) as a band
(DCM paper Fig. 2, with the spread of the seeds made visible)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dcmkd.report.results import CellStats  # noqa: E402


def plot_row_curves(stats: Sequence[CellStats], networks: Sequence[str], title: str,
                    path: str | Path) -> None:
    """One panel per reported network, one line per column (method), band = range over seeds."""
    panels = [n for n in networks if any(s.network == n for s in stats)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, net in zip(axes[0], panels):
        for s in (s for s in stats if s.network == net):
            # the epochs every seed evaluated (runs may evaluate every N epochs)
            common = sorted(set.intersection(*(set(e for e, _ in c) for c in s.curves)))
            if not common:
                continue
            curves = [[dict(c)[e] for e in common] for c in s.curves]
            epochs = common
            mean = [sum(v) / len(v) for v in zip(*curves)]
            seeds = f"{len(curves)} seed" + ("s" if len(curves) > 1 else "")
            line, = ax.plot(epochs, mean, label=f"{s.column} ({seeds})")
            if len(curves) > 1:
                ax.fill_between(epochs, [min(v) for v in zip(*curves)],
                                [max(v) for v in zip(*curves)], color=line.get_color(),
                                alpha=0.2, linewidth=0)
        model = next((s.model for s in stats if s.network == net and s.model), "")
        ax.set_title(f"{net}: {model}" if model else net)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 error (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
