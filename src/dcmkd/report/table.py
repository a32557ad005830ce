"""Tables in the paper's layout (Markdown) and in long form (CSV)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterable, Sequence

from dcmkd.experiment import Experiment, slug
from dcmkd.report.results import CellStats, RunResult, fmt
from dcmkd.weights import atomic_write_text


def collect(exp: Experiment, runs: Iterable) -> list[CellStats]:
    """Statistics of every visible (row, column, network) of ``exp`` from planned runs
    (objects with ``cell``, ``seed``, ``run_dir`` and ``config``), in table order."""
    runs = list(runs)
    keys = {r.cell.key for r in runs}
    stats: dict[tuple[str, str, int], CellStats] = {}
    for cell in exp.cells:
        if cell.hidden or cell.key not in keys:
            continue
        for i, label in enumerate(exp.networks):
            if cell.net[i] >= 0:    # -1: the cell's runs have no such network
                stats[(cell.row, cell.column, i)] = CellStats(cell.row, cell.column, label,
                                                              "", cell.paper[i])
    for run in runs:
        if run.cell.hidden:
            continue
        result = RunResult.load(run.run_dir)
        for i in range(len(exp.networks)):
            j = run.cell.net[i]
            if j < 0:
                continue
            s = stats[(run.cell.row, run.cell.column, i)]
            nets = run.config["nets"]
            s.model = nets[j] if j < len(nets) else "?"
            s.planned += 1
            value = result.final(j)
            if value is None:
                continue
            s.top1.append(value)
            top5 = result.final(j, "top5")
            if top5 is not None:
                s.top5.append(top5)
            s.curves.append(result.curve(j))
            s.losses.append(result.loss_curve(j))
            if "seconds" in result.summary:
                s.seconds.append(float(result.summary["seconds"]))
    return list(stats.values())


def _entry(s: CellStats, with_top5: bool) -> str:
    """``ours · paper · Δ``: ours is mean(std) over seeds (``[k/n runs]`` while incomplete)."""
    if s.runs == 0:
        ours = "—"
    else:
        ours = fmt(s.mean) + (f"({fmt(s.std)})" if s.std is not None else "")
        if with_top5 and s.mean_top5 is not None:
            ours += f"/{fmt(s.mean_top5)}"
        if s.runs < s.planned:
            ours += f" [{s.runs}/{s.planned} runs]"
    if s.paper.top1 is None:
        return ours
    paper = fmt(s.paper.top1) + (f"({fmt(s.paper.std)})" if s.paper.std is not None else "")
    if with_top5 and s.paper.top5 is not None:
        paper += f"/{fmt(s.paper.top5)}"
    diff = f" · {s.diff:+.2f}" if s.diff is not None else ""
    return f"{ours} · {paper}{diff}"


def markdown(exp: Experiment, stats: Sequence[CellStats], *, scale: str | None = "full",
             seeds: int | None = None) -> str:
    """The paper's layout: a line per row, a column per (method column, network); ``scale``
    None (runs given by hand) leaves the scale out."""
    with_top5 = any(s.paper.top5 is not None for s in stats)
    has_paper = any(s.paper.top1 is not None for s in stats)
    columns = [c for c in exp.columns if any(s.column == c for s in stats)]
    heads = [f"{c} {n}" if len(exp.networks) > 1 else c for c in columns for n in exp.networks]
    by_key = {(s.row, s.column, s.network): s for s in stats}
    metric = "top-1" + ("/top-5" if with_top5 else "")
    lines = [f"# {exp.title}", "",
             (f"Source: {exp.source}." if exp.source else "")
             + (f" Scale: **{scale}**" if scale else "")
             + ((", " if scale else " ") + f"{seeds} seed(s)" if seeds else "")
             + (" planned, some cells not yet complete"
                if seeds and any(s.runs < s.planned for s in stats) else "")
             + f". Entries: test {metric} error (%) of each network's own classifier at the "
             "last epoch, mean(std) over seeds"
             + (" · the paper's number · the difference (ours − paper)." if has_paper else "."),
             "", "| " + " | ".join(["", "networks run", *heads]) + " |",
             "|" + "---|" * (len(heads) + 2)]
    for row in exp.rows:
        row_stats = [s for s in stats if s.row == row]
        if not row_stats:
            continue
        found = [next((s.model for s in row_stats if s.network == n and s.model), None)
                 for n in exp.networks]
        models = " + ".join(m for m in found if m) or "?"
        entries = [(_entry(by_key[(row, c, n)], with_top5) if (row, c, n) in by_key else "")
                   for c in columns for n in exp.networks]
        lines.append("| " + " | ".join([row, models, *entries]) + " |")
    times = _training_times(exp, by_key, columns)
    if times:
        lines += ["", "Training time per run, minutes (mean over the finished runs; evaluation "
                  "not included): " + " · ".join(times) + "."]
    if exp.notes:
        lines += ["", exp.notes.strip()]
    return "\n".join(lines) + "\n"


def _training_times(exp: Experiment, by_key: dict[tuple[str, str, str], CellStats],
                    columns: Sequence[str]) -> list[str]:
    """``ROW: COLUMN m, …`` for every row with a timed run, from each cell's first network's
    entry (one run serves all the networks of its cell)."""
    out = []
    for row in exp.rows:
        entries = [(c, by_key.get((row, c, exp.networks[0]))) for c in columns]
        cells = [f"{c} {e.mean_minutes:.1f}" for c, e in entries
                 if e is not None and e.mean_minutes is not None]
        if cells:
            out.append(f"{row}: " + ", ".join(cells))
    return out


CSV_FIELDS = ("experiment", "scale", "row", "column", "network", "model", "runs", "planned",
              "mean_top1", "std_top1", "mean_top5", "paper_top1", "paper_std", "paper_top5",
              "diff_top1", "values_top1", "mean_train_minutes")


def to_csv(exp: Experiment, stats: Sequence[CellStats], scale: str | None = "full") -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for s in stats:
        w.writerow([exp.name, scale, s.row, s.column, s.network, s.model, s.runs, s.planned,
                    _num(s.mean), _num(s.std), _num(s.mean_top5), _num(s.paper.top1),
                    _num(s.paper.std), _num(s.paper.top5), _num(s.diff),
                    " ".join(f"{v:.4f}" for v in s.top1), _num(s.mean_minutes)])
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def write_experiment_report(exp: Experiment, runs: Sequence, folder: str | Path, *,
                            scale: str | None = "full") -> dict[str, Path]:
    """``table.md``, ``table.csv`` and ``curves/<row>.png`` in ``folder``; an experiment with
    ``metrics`` (a face or detection table) gets its metrics' table
    (:mod:`dcmkd.report.task_table`), curves of its first metric."""
    folder = Path(folder)
    ylabel: dict[str, str] = {}
    if exp.metrics:   # a face or detection table: the metrics it declares
        from dcmkd.report.task_table import collect_metrics, metrics_csv, metrics_markdown

        stats: Sequence = collect_metrics(exp, runs)
        text, table = metrics_markdown, metrics_csv
        ylabel = {"ylabel": f"test {exp.metrics[0][1]} (%)"}
    else:
        stats = collect(exp, runs)   # a run that cannot be read leaves no report folder behind
        text, table = markdown, to_csv
    folder.mkdir(parents=True, exist_ok=True)
    seeds = len({r.seed for r in runs}) or None
    paths = {"table_md": folder / "table.md", "table_csv": folder / "table.csv"}
    atomic_write_text(paths["table_md"], text(exp, stats, scale=scale, seeds=seeds))
    atomic_write_text(paths["table_csv"], table(exp, stats, scale))
    try:
        from dcmkd.report.curves import plot_row_curves
    except ImportError:  # matplotlib is an optional dependency
        return paths
    curves = folder / "curves"
    for row in exp.rows:
        row_stats = [s for s in stats if s.row == row and s.curves]
        if row_stats:
            path = curves / f"{slug(row)}.png"
            title = f"{exp.name}: {row}" + (f" ({scale})" if scale else "")
            losses = {(s.column, s.network): s.losses for s in row_stats if any(s.losses)}
            plot_row_curves(row_stats, exp.networks, title, path, losses=losses or None,
                            **ylabel)
            paths[f"curves/{row}"] = path
    return paths
