"""``dcmkd report RUN_DIRS...``: the same table for any runs, grouped by what differs.

Runs whose configs are equal except for the seed (and the folder, device, logging) are the seeds
of one cell. Cells with the same configuration apart from the method form a row; the method is
the column. A row is labelled with its backbones and the config values that tell it from the
other rows (e.g. ``data.label_noise=0.2``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dcmkd.recipes.experiment import Cell, Experiment, PaperValue

#: config keys that do not define a cell
IGNORED = ("seed", "out", "quiet", "device", "tensorboard", "checkpoint_every_steps",
           "data.workers", "data.cache_dir", "data.root", "data.download")


@dataclass(frozen=True)
class LoadedRun:
    cell: Cell
    seed: int
    run_dir: Path
    config: dict[str, Any]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def group_runs(run_dirs: Sequence[str | Path]) -> tuple[Experiment, list[LoadedRun]]:
    from dcmkd.engine.config import load_yaml

    loaded = []
    for d in run_dirs:
        path = Path(d)
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(f"{path} is not a run folder (no config.yaml)")
        cfg = load_yaml(path / "config.yaml")
        flat = {k: v for k, v in _flatten(cfg).items() if k not in IGNORED}
        loaded.append((path, cfg, flat))
    if not loaded:
        raise ValueError("no run folders given")
    keys = sorted({k for _, _, f in loaded for k in f} - {"method", "nets"})
    varying = [k for k in keys if len({repr(f.get(k)) for _, _, f in loaded}) > 1]
    width = max(len(cfg["nets"]) for _, cfg, _ in loaded)
    networks = tuple(f"Net{i + 1}" for i in range(width))
    rows: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], Cell] = {}
    runs = []
    for path, cfg, flat in loaded:
        row = " + ".join(cfg["nets"])
        extra = [f"{k}={flat.get(k)}" for k in varying]
        if extra:
            row += " (" + ", ".join(extra) + ")"
        col = str(cfg["method"])
        rows += [row] if row not in rows else []
        columns += [col] if col not in columns else []
        if (row, col) not in cells:
            n = len(cfg["nets"])
            cells[(row, col)] = Cell(row, col, {}, tuple(PaperValue() for _ in networks),
                                     tuple(min(i, n - 1) for i in range(width)))
        runs.append(LoadedRun(cells[(row, col)], int(cfg.get("seed", 0)), path, cfg))
    exp = Experiment("runs", "Results of the given runs", f"{len(runs)} run folders", networks,
                     tuple(columns), tuple(rows), tuple(cells.values()), seeds=0)
    return exp, runs


def report_runs(run_dirs: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and curves for arbitrary run folders into ``out``."""
    from dcmkd.report.table import write_experiment_report

    exp, runs = group_runs(run_dirs)
    return write_experiment_report(exp, runs, out, scale="runs")
