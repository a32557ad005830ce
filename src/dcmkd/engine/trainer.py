"""``Trainer(cfg).fit()``: train the run a config describes (build it, then the loop).

The loop itself is :func:`dcmkd.engine.loop.fit`, which also trains built objects (your own
networks and data); the config path is :func:`dcmkd.engine.build.build`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dcmkd.engine.build import build
from dcmkd.engine.loop import Log, TrainingDiverged, fit
from dcmkd.run_folder import RunFolder, default_run_path


class Trainer:
    """``Trainer(cfg).fit()``: build a config's run and train it (see :func:`dcmkd.engine.fit`).

    A finished run with the same config returns its summary without building anything; a run
    folder holding another config, or in use by another process, is refused before anything is
    built. Without ``out``, the folder is ``runs/<method>-<nets>-<data>-s<seed>-<hash>``, the
    hash of the settings that define the run."""

    def __init__(self, cfg: dict[str, Any], run_dir: str | Path | None = None, log: Log = print):
        self.cfg = cfg
        self.run = RunFolder(run_dir or cfg["out"] or default_run_path(cfg))
        self.log = log

    @property
    def run_dir(self) -> Path:
        return self.run.path

    def fit(self) -> dict[str, Any]:
        with self.run.lock():   # one writer per folder, from the check to the summary
            self.run.check(self.cfg)
            if self.run.finished:
                if not self.cfg["quiet"]:
                    self.log(f"{self.run}: finished run, not redone")
                return self.run.read_summary()  # type: ignore[return-value]
            built = build(self.cfg)
            return fit(built.method, built.data, self.run, built.settings, config=self.cfg,
                       log=self.log)


def train(cfg: dict[str, Any], run_dir: str | Path | None = None, **kw: Any) -> dict[str, Any]:
    return Trainer(cfg, run_dir, **kw).fit()


__all__ = ["Trainer", "TrainingDiverged", "train"]
