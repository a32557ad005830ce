"""The papers' experiments as data: one YAML file per table (see :mod:`.experiment` for the schema).

``load_experiment("dcm-table1")`` reads a bundled table; a path to a YAML file of the same schema
works too, so a user's own study runs through ``dcmkd reproduce`` like the papers' tables.
"""
from __future__ import annotations

from pathlib import Path

import dcmkd.yamlio as yamlio
from dcmkd.experiment import Cell, Experiment, PaperMetrics, PaperValue, _deep_merge
from dcmkd.recipes.runner import PlannedRun, cell_config, plan, reproduce
from dcmkd.recipes.scales import SCALES, SMOKE_STANDINS, shorten
from dcmkd.registry import UnknownNameError

RECIPE_DIR = Path(__file__).parent


def list_experiments() -> list[str]:
    """Names of the bundled experiments, in file order (``dcm_table1.yaml`` → ``dcm-table1``)."""
    return [p.stem.replace("_", "-") for p in sorted(RECIPE_DIR.glob("*.yaml"))]


def load_experiment(name_or_path: str | Path) -> Experiment:
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:   # a file was meant
            raise FileNotFoundError(f"no such file: {path} (an experiment file, or one of "
                                    f"the bundled experiments: {', '.join(list_experiments())})")
        names = list_experiments()
        if str(name_or_path) not in names:
            raise UnknownNameError("experiment", str(name_or_path), names)
        path = RECIPE_DIR / f"{str(name_or_path).replace('-', '_')}.yaml"
    data = yamlio.load(path)
    exp = Experiment.from_dict(data, where=path.name)
    if path.parent == RECIPE_DIR and exp.name != path.stem.replace("_", "-"):
        raise ValueError(f"{path.name}: name '{exp.name}' should be "
                         f"'{path.stem.replace('_', '-')}'")
    if exp.metrics:
        _check_task_metrics(exp, path.name)
    return exp


def _check_task_metrics(exp: Experiment, where: str) -> None:
    """The metrics of a task table are its cells' task's (one task for all its cells)."""
    from dcmkd.engine.config import resolve
    from dcmkd.report.task_table import check_metrics, task_of

    tasks = {task_of(resolve(_deep_merge(exp.base, c.config))) for c in exp.cells}
    if len(tasks) != 1 or "classification" in tasks:
        raise ValueError(f"{where}: metrics are for a table of one face or detection task; its "
                         f"cells are of the task(s) {', '.join(sorted(tasks))}")
    check_metrics(exp, tasks.pop())


__all__ = ["Cell", "Experiment", "PaperMetrics", "PaperValue", "PlannedRun", "SCALES",
           "SMOKE_STANDINS", "cell_config", "list_experiments", "load_experiment", "plan",
           "reproduce", "shorten"]
