"""``dcmkd report RUN_DIRS...``: the same table for any runs, grouped by what differs.

Runs whose configs are equal except for the seed (and the keys that do not define a run,
:data:`dcmkd.run_folder.RESUMABLE_KEYS`: folder, device, logging…) are the seeds of one cell. Cells with the same configuration apart from the method form a row; the method is
the column. A row is labelled with its backbones and the config values that tell it from the
other rows (e.g. ``data.label_noise=0.2``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dcmkd.recipes.experiment import Cell, Experiment, PaperValue
from dcmkd.report.table import write_experiment_report
from dcmkd.run_folder import RunFolder, defining


@dataclass(frozen=True)
class LoadedRun:
    cell: Cell
    seed: int
    run_dir: Path
    config: dict[str, Any]


def group_runs(run_dirs: Sequence[str | Path]) -> tuple[Experiment, list[LoadedRun]]:
    """Group run folders into cells (the configs that define a run, apart from the seed)."""
    loaded = []
    for d in run_dirs:
        run = RunFolder(d).require_run()
        cfg = run.read_config() or {}
        flat = {k: v for k, v in defining(cfg).items() if k != "seed"}
        loaded.append((run.path, cfg, flat))
    if not loaded:
        raise ValueError("no run folders given")
    keys = sorted({k for _, _, f in loaded for k in f} - {"method", "nets"})
    varying = [k for k in keys if len({repr(f.get(k)) for _, _, f in loaded}) > 1]
    width = max(len(cfg["nets"]) for _, cfg, _ in loaded)
    networks = tuple(f"Net{i + 1}" for i in range(width))
    group = _row_networks([tuple(cfg["nets"]) for _, cfg, _ in loaded])
    rows: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    runs = []
    for path, cfg, flat in loaded:
        row = " + ".join(group[tuple(cfg["nets"])])
        extra = [f"{k}={flat.get(k)}" for k in varying]
        if extra:
            row += " (" + ", ".join(extra) + ")"
        col = str(cfg["method"])
        rows += [row] if row not in rows else []
        columns += [col] if col not in columns else []
        if (row, col) not in cells:
            n = len(cfg["nets"])
            shown = len(group[tuple(cfg["nets"])])   # a network alone in its pair's row: both
            cells[(row, col)] = Cell(row, col, {}, tuple(PaperValue() for _ in networks),
                                     tuple(min(i, n - 1) if i < shown else -1
                                           for i in range(width)))
        seed = int(cfg.get("seed", 0))
        twin = next((r.run_dir for r in runs if r.cell is cells[(row, col)] and r.seed == seed),
                    None)
        if twin is not None:
            raise ValueError(f"{twin} and {path} are the same run (seed {seed} of one config): "
                             "give one of them, or their seeds would count twice")
        runs.append(LoadedRun(cells[(row, col)], seed, path, cfg))
    source = f"{len(runs)} run folder{'s' if len(runs) != 1 else ''} given to `dcmkd report`"
    exp = Experiment("runs", "Results of the given runs", source, networks,
                     tuple(columns), tuple(rows), tuple(cells.values()), seeds=0)
    return exp, runs


def _row_networks(nets: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """The row each run's networks belong to: its own, except that one network trained alone
    joins the row of a single group of several copies of that backbone (``resnet20`` with
    ``resnet20 + resnet20``), as the paper's tables show Ind beside DML and DCM."""
    group = {n: n for n in nets}
    for n in set(nets):
        if len(n) == 1:
            copies = {m for m in nets if len(m) > 1 and set(m) == set(n)}
            if len(copies) == 1:
                group[n] = copies.pop()
    return group


def report_runs(run_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and curves for arbitrary run folders into ``out``; an
    error when none of them is finished (a table of dashes would say nothing)."""
    exp, runs = group_runs(run_dirs)
    if not any(RunFolder(r.run_dir).finished for r in runs):
        raise ValueError(f"none of the {len(runs)} run folder(s) is finished (no "
                         f"{RunFolder.SUMMARY}): nothing to report yet")
    return write_experiment_report(exp, runs, out, scale=None)
