"""Tables of the face and detection tasks (SSKD Tables 7–9): the metrics an experiment declares
(:attr:`dcmkd.experiment.Experiment.metrics`), each a column, mean(std) over seeds beside the
paper's numbers.

A run's figures are read from its metrics history (``metrics.jsonl``) by the key functions of its
task's own module (:func:`dcmkd.tasks.face.face_key`, :func:`dcmkd.tasks.detection.coco_key`):
the **last evaluated epoch** of each network, as the classification tables report the last
epoch. A metric the task could not measure on that test set (a TAR at a FAR below one over the
impostor pairs; a COCO size range without ground truth, NaN) is left out of the mean; a cell
with no value for it shows ``—``. The std is the sample standard deviation over seeds (ddof = 1),
as for the classification tables; the paper's Table 7 std is over IJB-A's 10 splits instead. A
face run evaluated on IJB-A (``task.ijba``) records that std too (``{metric}_std``): its entry
is ``mean±split std`` as the paper's, with the std over seeds in parentheses after it.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from dcmkd.experiment import Experiment, PaperMetrics
from dcmkd.report.results import RunResult, fmt
from dcmkd.tasks.build import task_name
from dcmkd.tasks.detection import COCO_METRICS, coco_key
from dcmkd.tasks.face import FACE_METRICS, face_key

#: task → (its key function ``(net, metric, prefix) → record key``, its metrics in table order,
#: their column labels)
TASK_METRICS: dict[str, tuple[Callable[..., str], tuple[str, ...], tuple[str, ...]]] = {
    "face": (face_key, FACE_METRICS, ("TAR@FAR=0.01", "TAR@FAR=0.001", "Rank-1", "Rank-5")),
    "detection": (coco_key, COCO_METRICS, COCO_METRICS),
}


def task_of(config: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """The task of a run: its summary's ``task``, else the one its config's data names."""
    if summary and summary.get("task"):
        return str(summary["task"])
    return task_name(config) if "data" in config else "classification"


def default_metrics(task: str) -> tuple[tuple[str, str], ...]:
    """Every metric of ``task`` with its label (``dcmkd report`` of task runs)."""
    _, names, labels = _task(task)
    return tuple(zip(names, labels))


def check_metrics(exp: Experiment, task: str) -> None:
    """A ValueError naming the first metric of ``exp`` that ``task`` does not record."""
    _, names, _ = _task(task)
    for name, _ in exp.metrics:
        if name not in names:
            raise ValueError(f"{exp.name}: metric '{name}' is not one of the {task} task's "
                             f"({', '.join(names)})")


def _task(task: str) -> tuple[Callable[..., str], tuple[str, ...], tuple[str, ...]]:
    if task not in TASK_METRICS:
        raise ValueError(f"the {task} task has no metric table (tasks with one: "
                         f"{', '.join(TASK_METRICS)})")
    return TASK_METRICS[task]


def last_metrics(history: Sequence[dict[str, Any]], task: str, net: int,
                 names: Sequence[str]) -> dict[str, float] | None:
    """Network ``net``'s ``names`` at the last epoch that evaluated it (test set), finite values
    only; None when no record holds any of them."""
    key = _task(task)[0]
    for record in reversed(history):
        found = {m: float(record[key(net, m)]) for m in names if key(net, m) in record
                 and record[key(net, m)] is not None}
        if found:
            return {m: v for m, v in found.items() if math.isfinite(v)}
    return None


@dataclass
class MetricStats:
    """One (row, column, network) entry of a task table."""

    row: str
    column: str
    network: str
    model: str
    paper: PaperMetrics
    values: dict[str, list[float]] = field(default_factory=dict)   # metric → one per seed
    split_stds: dict[str, list[float]] = field(default_factory=dict)   # IJB-A: std over splits
    curves: list[list[tuple[int, float]]] = field(default_factory=list)   # first metric
    losses: list[list[tuple[int, float]]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    planned: int = 0
    runs: int = 0          # finished runs

    def mean(self, metric: str) -> float | None:
        v = self.values.get(metric) or []
        return statistics.fmean(v) if v else None

    def std(self, metric: str) -> float | None:
        v = self.values.get(metric) or []
        return statistics.stdev(v) if len(v) > 1 else None

    @property
    def mean_minutes(self) -> float | None:
        return statistics.fmean(self.seconds) / 60 if self.seconds else None


def collect_metrics(exp: Experiment, runs: Iterable) -> list[MetricStats]:
    """Statistics of every visible (row, column, network) of a task experiment from planned
    runs (objects with ``cell``, ``seed``, ``run_dir`` and ``config``), in table order."""
    runs = list(runs)
    keys = {r.cell.key for r in runs}
    names = [m for m, _ in exp.metrics]
    stats: dict[tuple[str, str, int], MetricStats] = {}
    for cell in exp.cells:
        if cell.hidden or cell.key not in keys:
            continue
        for i, label in enumerate(exp.networks):
            if cell.net[i] >= 0:
                stats[(cell.row, cell.column, i)] = MetricStats(
                    cell.row, cell.column, label, "", cell.paper[i], {m: [] for m in names})
    for run in runs:
        if run.cell.hidden:
            continue
        result = RunResult.load(run.run_dir)
        task = task_of(run.config, result.summary)
        for i in range(len(exp.networks)):
            j = run.cell.net[i]
            if j < 0:
                continue
            s = stats[(run.cell.row, run.cell.column, i)]
            nets = run.config["nets"]
            s.model = nets[j] if j < len(nets) else "?"
            s.planned += 1
            if not result.finished:
                continue
            found = last_metrics(result.history, task, j, names) or {}
            s.runs += 1
            for m, v in found.items():
                s.values[m].append(v)
            spread = last_metrics(result.history, task, j, [f"{m}_std" for m in names]) or {}
            for m, v in spread.items():
                s.split_stds.setdefault(m[:-len("_std")], []).append(v)
            key = _task(task)[0]
            s.curves.append([(int(r["epoch"]), float(r[key(j, names[0])]))
                             for r in result.history if key(j, names[0]) in r
                             and r[key(j, names[0])] is not None
                             and math.isfinite(float(r[key(j, names[0])]))])
            s.losses.append(result.loss_curve(j))
            if "seconds" in result.summary:
                s.seconds.append(float(result.summary["seconds"]))
    return list(stats.values())


def _paper_text(paper: PaperMetrics, k: int) -> str:
    v, sd = paper.values[k], paper.stds[k]
    if v is None:
        return ""
    return f"{v:.1f}" + (f"±{sd:.1f}" if sd is not None else "")


def _entry(s: MetricStats, k: int, metric: str) -> str:
    """``ours · paper``: ours is mean(std) over seeds (``[k/n runs]`` while incomplete)."""
    mean, split = s.mean(metric), s.split_stds.get(metric)
    ours = "—" if mean is None else fmt(mean) + (
        f"±{fmt(statistics.fmean(split))}" if split else "") + (
        f"({fmt(s.std(metric))})" if s.std(metric) is not None else "")
    if s.runs and s.runs < s.planned:
        ours += f" [{s.runs}/{s.planned} runs]"
    paper = _paper_text(s.paper, k) if k < len(s.paper.values) else ""
    return f"{ours} · {paper}" if paper else ours


def metrics_markdown(exp: Experiment, stats: Sequence[MetricStats], *,
                     scale: str | None = "full", seeds: int | None = None) -> str:
    """A line per row, a column per (method column, network, metric)."""
    has_paper = any(s.paper.reported for s in stats)
    columns = [c for c in exp.columns if any(s.column == c for s in stats)]
    prefix = len(columns) > 1 or len(exp.networks) > 1
    heads = [(f"{c} {n} " if len(exp.networks) > 1 else f"{c} " if prefix else "") + label
             for c in columns for n in exp.networks for _, label in exp.metrics]
    by_key = {(s.row, s.column, s.network): s for s in stats}
    lines = [f"# {exp.title}", "",
             (f"Source: {exp.source}." if exp.source else "")
             + (f" Scale: **{scale}**" if scale else "")
             + ((", " if scale else " ") + f"{seeds} seed(s)" if seeds else "")
             + (" planned, some cells not yet complete"
                if seeds and any(s.runs < s.planned for s in stats) else "")
             + ". Entries: " + ", ".join(label for _, label in exp.metrics)
             + " (%) of each network on the test set at its last evaluated epoch, mean(std) "
             "over seeds" + ("; ± the std over IJB-A's splits" if any(
                 s.split_stds for s in stats) else "")
             + (" · the paper's number (± its std)." if has_paper else "."),
             "", "| " + " | ".join(["", "networks run", *heads]) + " |",
             "|" + "---|" * (len(heads) + 2)]
    for row in exp.rows:
        row_stats = [s for s in stats if s.row == row]
        if not row_stats:
            continue
        found = [next((s.model for s in row_stats if s.network == n and s.model), None)
                 for n in exp.networks]
        models = " + ".join(m for m in found if m) or "?"
        entries = [(_entry(by_key[(row, c, n)], k, m) if (row, c, n) in by_key else "")
                   for c in columns for n in exp.networks
                   for k, (m, _) in enumerate(exp.metrics)]
        lines.append("| " + " | ".join([row, models, *entries]) + " |")
    times = []
    for row in exp.rows:
        cells = [f"{c} {e.mean_minutes:.1f}" for c in columns
                 if (e := by_key.get((row, c, exp.networks[0]))) is not None
                 and e.mean_minutes is not None]
        if cells:
            times.append(f"{row}: " + ", ".join(cells))
    if times:
        lines += ["", "Training time per run, minutes (mean over the finished runs; the run's "
                  "own seconds, evaluation included): " + " · ".join(times) + "."]
    if exp.notes:
        lines += ["", exp.notes.strip()]
    return "\n".join(lines) + "\n"


METRIC_CSV_FIELDS = ("experiment", "scale", "row", "column", "network", "model", "metric",
                     "runs", "planned", "mean", "std", "paper", "paper_std", "diff", "values",
                     "mean_train_minutes")


def metrics_csv(exp: Experiment, stats: Sequence[MetricStats], scale: str | None = "full"
                ) -> str:
    """Long form: a line per (row, column, network, metric)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(METRIC_CSV_FIELDS)
    for s in stats:
        for k, (m, _) in enumerate(exp.metrics):
            mean, paper = s.mean(m), s.paper.values[k] if k < len(s.paper.values) else None
            diff = mean - paper if mean is not None and paper is not None else None
            w.writerow([exp.name, scale, s.row, s.column, s.network, s.model, m, s.runs,
                        s.planned, _num(mean), _num(s.std(m)), _num(paper),
                        _num(s.paper.stds[k] if k < len(s.paper.stds) else None), _num(diff),
                        " ".join(f"{v:.4f}" for v in s.values.get(m, [])),
                        _num(s.mean_minutes)])
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


__all__ = ["TASK_METRICS", "MetricStats", "check_metrics", "collect_metrics", "default_metrics",
           "last_metrics", "metrics_csv", "metrics_markdown", "task_of"]
