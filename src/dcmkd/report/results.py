"""Results of finished runs, aggregated per table cell: mean(std) over seeds beside the paper.

The reported number is the **last-epoch** test error of the network's own classifier (C1), as in
both papers (not the best epoch; ``summary.json`` keeps ``best_top1`` too, but tables never use
it). The std is the sample standard deviation over seeds (ddof = 1; the papers do not say which).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcmkd.engine.plots import training_loss
from dcmkd.experiment import PaperValue
from dcmkd.run_folder import RunFolder


@dataclass
class RunResult:
    """One finished (or partial) run folder."""

    run_dir: Path
    summary: dict[str, Any] | None
    history: list[dict[str, Any]]

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunResult":
        run = RunFolder(run_dir)
        return cls(run.path, run.read_summary(), run.read_metrics())

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def final(self, net: int, metric: str = "top1") -> float | None:
        if self.summary is None:
            return None
        values = self.summary.get(f"test_{metric}") or []
        return float(values[net]) if net < len(values) else None

    def loss_curve(self, net: int) -> list[tuple[int, float]]:
        """``(epoch, training loss)`` at every epoch (the sum of network ``net``'s logged
        terms, :func:`dcmkd.engine.plots.training_loss`)."""
        return [(int(r["epoch"]), v) for r in self.history
                if (v := training_loss(r, net)) is not None]

    def curve(self, net: int, metric: str = "top1") -> list[tuple[int, float]]:
        """``(epoch, test error)`` at every evaluated epoch."""
        key = f"test/net{net}/C1/{metric}"
        return [(int(r["epoch"]), r[key]) for r in self.history if key in r]


@dataclass
class CellStats:
    """One (row, column, network) entry of a table."""

    row: str
    column: str
    network: str
    model: str
    paper: PaperValue
    top1: list[float] = field(default_factory=list)
    top5: list[float] = field(default_factory=list)
    curves: list[list[tuple[int, float]]] = field(default_factory=list)   # (epoch, error)
    losses: list[list[tuple[int, float]]] = field(default_factory=list)   # (epoch, train loss)
    seconds: list[float] = field(default_factory=list)   # training time of each finished run
    planned: int = 0

    @property
    def runs(self) -> int:
        return len(self.top1)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.top1) if self.top1 else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else None

    @property
    def mean_minutes(self) -> float | None:
        """Mean training time of the finished runs (the sum of their epochs' training seconds;
        evaluation excluded), in minutes."""
        return statistics.fmean(self.seconds) / 60 if self.seconds else None

    @property
    def mean_top5(self) -> float | None:
        return statistics.fmean(self.top5) if self.top5 else None

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.paper.top1 is None:
            return None
        return self.mean - self.paper.top1


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
