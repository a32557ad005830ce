"""``Trainer(cfg).fit()``: train the run a config describes (build it, then the loop).

The loop itself is :func:`dcmkd.engine.loop.fit`, which also trains built objects (your own
networks and data); the config path is :func:`dcmkd.engine.build.build`.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dcmkd.data.build import dataset_identity, identity_key
from dcmkd.engine import distributed
from dcmkd.engine.build import build
from dcmkd.engine.config import resolve
from dcmkd.engine.loop import Log, TrainingDiverged, check_run, finished_summary, fit
from dcmkd.run_folder import RunFolder, absolute_path, default_run_path
from dcmkd.tasks.build import task_name


class Trainer:
    """``Trainer(cfg).fit()``: build a config's run and train it (see :func:`dcmkd.engine.fit`).

    A finished run with the same config returns its summary without building its method or
    loaders (the data's identity is read to compare with the run's ``data.json``: labels, file
    names and sizes); a run folder holding another config, or in use by another process, is
    refused before anything is built. Without ``out``, the folder is ``runs/<method>-<nets>-<data>-s<seed>-<hash>``, the
    hash of the settings that define the run."""

    def __init__(self, cfg: dict[str, Any] | str, run_dir: str | Path | None = None,
                 log: Log = print):
        """``cfg``: a config of any completeness (a dict, a recipe name or a YAML file), resolved
        with :func:`dcmkd.engine.config.resolve`: ``Trainer({"method": "dml"})`` is the paper's
        recipe for the default networks with DML."""
        given = resolve(cfg)   # the default folder's hash: of the paths as given, as ever
        self.cfg = cfg = absolute_paths(given)
        self.run = RunFolder(run_dir or cfg["out"] or default_run_path(given))
        self.log = log

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        ctx = distributed.context(cfg["parallel"], len(cfg["nets"]), cfg["device"],
                                  cfg["dist_timeout"])
        main = ctx is None or ctx.is_main
        log = self.log if main and not cfg["quiet"] else (lambda s: None)
        with self.run.lock() if main else nullcontext():   # one writer, check to summary
            summary = finished_summary(self.run, ctx, self._finished_here, log)
            if summary is not None:   # a finished run: nothing built, no data loaded
                return summary
            built = build(cfg, ctx)
            self.run.expect_weights(built.method.state_dict())   # a checkpoint must fit it
            return fit(built.method, built.data, self.run, built.settings, config=cfg,
                       log=self.log, ctx=ctx)

    def _finished_here(self) -> bool:
        """Whether the folder holds this run finished on the same data; a folder of another
        run (config or data) is refused."""
        if not check_run(self.run, self.cfg):
            return False
        check_finished_data(self.run, self.cfg, self.log)
        return True


def absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with its relative paths made absolute (``~`` expanded): ``data.root``,
    ``teacher_weights``, ``task.backbone_weights`` (a path or a list of them) and the IJB-A
    folders ``task.ijba`` / ``task.ijba_images``, so that the
    run folder's config names its data and weights from any directory. ``data.root`` does not
    define a run (another root of the same data, checked by ``data.json``, is accepted later);
    a weights file is told by its content (``weights.json``), not by its spelling."""
    cfg = {**cfg, "data": {**cfg["data"], "root": absolute_path(cfg["data"].get("root"))},
           "teacher_weights": absolute_path(cfg.get("teacher_weights"))}
    if isinstance(cfg.get("task"), dict):
        cfg["task"] = {**cfg["task"], **{k: absolute_path(cfg["task"][k]) for k in
                                         ("backbone_weights", "ijba", "ijba_images")
                                         if k in cfg["task"]}}
    return cfg


def check_finished_data(run: RunFolder, cfg: dict[str, Any], log: Log = print,
                        known: dict[str, dict[str, Any] | None] | None = None) -> None:
    """Refuse a finished run whose ``data.json`` names other data than ``cfg`` names now
    (``data.root`` does not define a run). The identity is read (never downloaded) once per
    :func:`~dcmkd.data.build.identity_key` kept in ``known``; data that is not there cannot be
    compared, which is logged (for face and detection data, once per root in ``known``)."""
    if not run.finished or run.read_data() is None:
        return
    known = {} if known is None else known
    task = task_name(cfg)
    if task != "classification":   # the task's data identity needs its loaders: said once
        key = f"{task}:{cfg['data'].get('root')}"
        if key not in known:
            known[key] = None
            log(f"{run}: data.json not compared with the {task} data (this version compares "
                "a finished run's classification data only)")
        return
    key = identity_key(cfg["data"])
    if key not in known:
        try:
            known[key] = dataset_identity({**cfg["data"], "download": False})
        except FileNotFoundError as e:
            log(f"{run}: data.json not compared with the data ({e})")
            known[key] = None
    if known[key] is not None:
        run.check(cfg, known[key])


def train(cfg: dict[str, Any], run_dir: str | Path | None = None, **kw: Any) -> dict[str, Any]:
    return Trainer(cfg, run_dir, **kw).fit()


__all__ = ["Trainer", "TrainingDiverged", "absolute_paths", "check_finished_data", "train"]
