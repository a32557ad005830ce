"""Test error per epoch for each network (DCM paper Fig. 2 style)."""
from __future__ import annotations

from pathlib import Path


def plot_test_error(history: list[dict], nets: list[str], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    for n, name in enumerate(nets):
        ax.plot(epochs, [r[f"test/net{n}/C1/top1"] for r in history], label=f"net{n} {name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 error (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
