"""``dcmkd report RUN_DIRS...``: the same table for any runs, grouped by what differs.

Runs whose configs are equal except for the seed (and the keys that do not define a run,
:func:`dcmkd.options.resumable_keys`: folder, device, logging…) are the seeds of one cell.
Cells with the same configuration apart from the method form a row; the method is the column. A row is labelled with its backbones and the config values that tell it from the
other rows (e.g. ``data.label_noise=0.2``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dcmkd.methods import needs_teacher
from dcmkd.experiment import Cell, Experiment, PaperValue
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
        run = RunFolder(d).require_run(rebuild=None)
        cfg = run.read_config() or {}
        if run.built_from_objects:   # dcmkd.fit of built objects: the summary names them
            cfg = _built_config(run, cfg)
        flat = {k: v for k, v in defining(cfg).items() if k != "seed"}
        loaded.append((run.path, cfg, flat))
    if not loaded:
        raise ValueError("no run folders given")
    keys = sorted({k for _, _, f in loaded for k in f} - {"method", "nets"})
    varying = [k for k in keys if _varies(k, loaded)]
    width = max(len(_trained(cfg)) for _, cfg, _ in loaded)
    networks = tuple(f"Net{i + 1}" for i in range(width))
    group = _row_networks([_trained(cfg) for _, cfg, _ in loaded])
    rows: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    runs = []
    for path, cfg, flat in loaded:
        trained = _trained(cfg)
        row = " + ".join(group[trained])
        extra = [f"{k}={flat.get(k)}" for k in varying]
        if extra:
            row += " (" + ", ".join(extra) + ")"
        col = str(cfg["method"])
        rows += [row] if row not in rows else []
        columns += [col] if col not in columns else []
        if (row, col) not in cells:
            n, first = len(trained), len(cfg["nets"]) - len(trained)
            shown = len(group[trained])   # a network alone in its pair's row: both
            cells[(row, col)] = Cell(row, col, {}, tuple(PaperValue() for _ in networks),
                                     tuple(first + min(i, n - 1) if i < shown else -1
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


#: config keys of one method's options: they tell rows apart only where runs of one method
#: differ in them (an SSKD run's teacher or stages do not set it apart from the Ind run beside it)
METHOD_KEYS = ("teacher_weights", "teacher_net", "classifiers", "aux_kind")
METHOD_PREFIXES = ("loss.", "sskd.", "feature.")


def _varies(key: str, loaded: Sequence[tuple[Path, dict, dict]]) -> bool:
    """Whether ``key`` tells rows apart: its value differs between the runs (for a method's
    option, between runs of the same method)."""
    if key in METHOD_KEYS or key.startswith(METHOD_PREFIXES):
        methods = {str(cfg.get("method")) for _, cfg, _ in loaded}
        return any(len({repr(f.get(key)) for _, c, f in loaded if str(c.get("method")) == m})
                   > 1 for m in methods)
    return len({repr(f.get(key)) for _, _, f in loaded}) > 1


def _trained(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The networks a run trains and reports: all of them, but for a method that distils from
    a fixed teacher (kd, sskd, fitnets…: network 0) the students only."""
    nets = tuple(cfg["nets"])
    return nets[1:] if len(nets) > 1 and needs_teacher(str(cfg.get("method"))) else nets


def _built_config(run: RunFolder, cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a run that :func:`dcmkd.fit` trained from built objects, as a table needs
    it: the method's name and the networks' (from its summary; an unfinished run has none:
    its config's class names), beside the recorded description."""
    summary = run.read_summary() or {}
    method = cfg.get("method")
    name = summary.get("method") or (method.get("name") if isinstance(method, dict) else method)
    nets = summary.get("nets") or [str(n.get("class", f"net{i}")) if isinstance(n, dict) else
                                   str(n) for i, n in enumerate(cfg.get("networks") or [])]
    return {**{k: v for k, v in cfg.items() if k not in ("method", "networks")},
            "method": str(name or "fit"), "nets": list(nets) or ["net0"]}


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
    error when none of them is finished (a table of dashes would say nothing). Runs of the face
    or detection task get their task's metrics as columns (:mod:`dcmkd.report.task_table`);
    runs of different tasks are refused in one line."""
    from dcmkd.report.task_table import default_metrics, task_of

    tasks: dict[str, str] = {}
    for d in run_dirs:
        folder = RunFolder(d)
        tasks.setdefault(task_of(folder.read_config() or {}, folder.read_summary()), str(d))
    if len(tasks) > 1:
        named = ", ".join(f"{t} ({d})" for t, d in tasks.items())
        raise ValueError(f"the runs are of different tasks: {named}; report the runs of one "
                         "task at a time")
    exp, runs = group_runs(run_dirs)
    task = next(iter(tasks), "classification")
    if task != "classification":
        exp, runs = _as_task_table(exp, runs, default_metrics(task))
    if not any(RunFolder(r.run_dir).finished for r in runs):
        raise ValueError(f"none of the {len(runs)} run folder(s) is finished (no "
                         f"{RunFolder.SUMMARY}): nothing to report yet")
    return write_experiment_report(exp, runs, out, scale=None)


def _as_task_table(exp: Experiment, runs: list[LoadedRun],
                   metrics: tuple[tuple[str, str], ...]) -> tuple[Experiment, list[LoadedRun]]:
    """``exp`` as a table of ``metrics`` (no paper numbers), with its runs' cells to match."""
    from dataclasses import replace

    from dcmkd.experiment import PaperMetrics

    none = PaperMetrics.parse(None, len(metrics))
    cells = {c.key: replace(c, paper=tuple(none for _ in c.paper)) for c in exp.cells}
    exp = replace(exp, cells=tuple(cells.values()), metrics=metrics)
    return exp, [replace(r, cell=cells[r.cell.key]) for r in runs]
