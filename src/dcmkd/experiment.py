"""An experiment: a paper table as data (rows × columns of runs, with the paper's numbers).

Each ``*.yaml`` file of this folder is one experiment::

    name: dcm-table1                  # the file stem with '_' → '-'
    title: "DCM Table 1: CIFAR-100 top-1 error (%)"
    source: dcm-paper.md Table 1
    networks: [Net1, Net2]            # the reported networks (sub-columns)
    columns: [Ind, DML, DCM]
    seeds: 5                          # the paper's number of runs per cell
    base: {data: {name: cifar100}}    # run-config overrides for every cell
    scales: {quick: {epochs: 20}}     # optional per-scale overrides (see dcmkd.recipes.scales)
    rows:
      - name: ResNet-164 ×2
        config: {nets: [resnet164, resnet164]}
        cells:
          Ind: {config: {method: ind, nets: [resnet164]}, net: [0, 0], paper: ["22.56(0.20)", ...]}
          DML: {config: {method: dml}, paper: ["20.69(0.25)", "20.72(0.14)"]}

A cell is one run configuration (trained once per seed); its own ``scales`` (e.g.
``{quick: {loss: {rampup: 0}}}``) apply after the experiment's scale, for a cell that must
differ from the others at that scale. ``net`` maps each reported network to
the index of a network of that run (default: 0, 1, …): an ``ind`` run of one backbone serves both
columns of a ×2 pair, as in the paper. ``hidden: true`` marks a run others depend on (a teacher)
that the table does not show; ``teacher_weights: "@ROW/COLUMN"`` refers to that cell's first
exported network of the same seed.

Paper values are strings in the paper's own notation: ``"22.56(0.20)"`` (mean(std) top-1 error),
``"31.08/11.17"`` (top-1/top-5 error), ``"acc:69.1"`` or ``"acc:69.1/89.0"`` (accuracy, converted
to error), ``"-"`` (not reported).

**Task metrics** (the face and detection tables, SSKD Tables 7–9): an experiment whose runs are of
another task declares the metrics its table shows, in order, by the names its task records
(:data:`dcmkd.tasks.face.FACE_METRICS`, :data:`dcmkd.tasks.detection.COCO_METRICS`) with their
column labels::

    metrics: {tar@far=0.01: "TAR@FAR=0.01", tar@far=0.001: "TAR@FAR=0.001", rank1: Rank-1}

Its paper values then hold one number per metric, separated by ``/``, each with an optional
std as ``±`` or in parentheses: ``"76.9±4.3/55.2±5.7/84.6±2.1"``,
``"33.6/55.1/35.6/18.9/36.0/44.1"`` (``-`` for a metric not reported). Without ``metrics`` an experiment is a classification table
(top-1 error), as before. A cell's ``skip`` lists the scales at which it is not run (a reduced
protocol's rows differ from the paper's: ``skip: [quick]``, or ``skip: [full]`` for a row of the
reduced protocol only).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dcmkd.registry import UnknownNameError

_EXPERIMENT_KEYS = ("name", "title", "source", "networks", "columns", "seeds", "base", "scales",
                    "rows", "notes", "metrics")
_ROW_KEYS = ("name", "config", "cells")
_CELL_KEYS = ("config", "paper", "net", "hidden", "scales", "skip")
#: the scales of a reproduction (dcmkd.recipes.scales.SCALES; a cell's ``skip`` names them)
_SCALES = ("full", "quick", "smoke")
_NUMBER = r"(\d+(?:\.\d+)?)"


def slug(text: str) -> str:
    """A folder name for a row or column label: ``"WRN-28-10 + ResNet-110"`` →
    ``wrn-28-10_resnet-110``; the paper's ``(+)`` (dropout) is spelt out, so
    ``"WRN-28-10(+) ×2"`` → ``wrn-28-10plus_x2`` stays apart from ``"WRN-28-10 ×2"``."""
    s = text.lower().replace("×", "x").replace("→", "to").replace("(+)", "plus")
    s = s.replace("+", "_")
    s = re.sub(r"[^a-z0-9._-]+", "_", s)
    return re.sub(r"_+", "_", s).strip("_") or "run"


@dataclass(frozen=True)
class PaperValue:
    """A number of the paper: top-1 error (and its std over runs, top-5 error) in percent."""

    top1: float | None = None
    std: float | None = None
    top5: float | None = None

    @classmethod
    def parse(cls, text: str | float | int | None) -> "PaperValue":
        if text is None:
            return cls()
        if isinstance(text, (int, float)):
            return cls(float(text))
        s = str(text).strip()
        if s in ("", "-"):
            return cls()
        acc = s.startswith("acc:")
        body = s[4:] if acc else s
        m = re.fullmatch(rf"{_NUMBER}(?:\({_NUMBER}\))?(?:/{_NUMBER})?", body)
        if m is None:
            raise ValueError(f"paper value '{text}': expected e.g. '22.56(0.20)', '31.08/11.17' "
                             "or 'acc:69.1'")
        top1, std, top5 = (float(g) if g is not None else None for g in m.groups())
        if acc:
            top1 = round(100.0 - top1, 4)
            top5 = round(100.0 - top5, 4) if top5 is not None else None
        return cls(top1, std, top5)


@dataclass(frozen=True)
class PaperMetrics:
    """The paper's numbers of one network in a task table: one value (and std) per metric of the
    experiment's ``metrics``, None where the paper reports none."""

    values: tuple[float | None, ...] = ()
    stds: tuple[float | None, ...] = ()

    @classmethod
    def parse(cls, text: str | float | int | None, count: int) -> "PaperMetrics":
        """``"76.9±4.3/55.2±5.7"`` or ``"76.9(4.3)/55.2(5.7)"`` or ``"33.6/55.1"`` (``-``: not
        reported), ``count`` values; None, ``""`` or ``"-"`` alone: none reported."""
        if text is None or str(text).strip() in ("", "-"):
            return cls((None,) * count, (None,) * count)
        parts = [p.strip() for p in str(text).split("/")]
        if len(parts) != count:
            raise ValueError(f"paper value '{text}': expected {count} values separated by '/' "
                             "(one per metric, e.g. '76.9±4.3/55.2±5.7')")
        values: list[float | None] = []
        stds: list[float | None] = []
        for part in parts:
            if part == "-":
                values.append(None)
                stds.append(None)
                continue
            m = re.fullmatch(rf"{_NUMBER}\s*(?:(?:±|\+-)\s*{_NUMBER}|\({_NUMBER}\))?", part)
            if m is None:
                raise ValueError(f"paper value '{text}': '{part}' is not a number with an "
                                 "optional std (e.g. '76.9±4.3' or '76.9(4.3)')")
            values.append(float(m.group(1)))
            std = m.group(2) or m.group(3)
            stds.append(float(std) if std is not None else None)
        return cls(tuple(values), tuple(stds))

    @property
    def reported(self) -> bool:
        return any(v is not None for v in self.values)


@dataclass(frozen=True)
class Cell:
    row: str
    column: str
    config: dict[str, Any]          # overrides of this cell, merged over base and row
    paper: tuple[PaperValue, ...]   # one per reported network
    net: tuple[int, ...]            # index into the run's networks, per reported network
                                    # (-1: none, for ``dcmkd report``'s narrower runs)
    hidden: bool = False
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)  # this cell's, per scale
    skip: tuple[str, ...] = ()      # scales at which this cell is not run

    @property
    def key(self) -> str:
        return f"{self.row}/{self.column}"


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    source: str
    networks: tuple[str, ...]
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    cells: tuple[Cell, ...]
    seeds: int = 5
    base: dict[str, Any] = field(default_factory=dict)
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: str = ""
    #: (metric name as the task records it, column label), in table order; empty: a
    #: classification table of top-1 errors
    metrics: tuple[tuple[str, str], ...] = ()

    def cell(self, key: str) -> Cell:
        for c in self.cells:
            if c.key == key:
                return c
        raise UnknownNameError(f"cell of {self.name}", key, [c.key for c in self.cells])

    def select(self, rows: list[str] | None = None,
               columns: list[str] | None = None) -> list[Cell]:
        """The cells of the chosen rows and columns (all by default), in table order."""
        for names, known, what in ((rows, self.rows, "row"), (columns, self.columns, "column")):
            for name in names or ():
                if name not in known:
                    raise UnknownNameError(f"{what} of {self.name}", name, known)
        return [c for c in self.cells
                if (not rows or c.row in rows) and (not columns or c.column in columns)]

    def runs_at(self, cell: Cell, scale: str) -> bool:
        """Whether ``cell`` is run at ``scale`` (not in its ``skip``)."""
        return scale not in cell.skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "experiment") -> "Experiment":
        _check_keys(d, _EXPERIMENT_KEYS, f"{where}: experiment key")
        for k in ("name", "title", "columns", "rows"):
            if k not in d:
                raise ValueError(f"{where}: missing '{k}'")
        networks = tuple(d.get("networks") or ("Net1",))
        columns = tuple(d["columns"])
        metrics = _metrics(d.get("metrics"), where)
        cells, rows = [], []
        for r in d["rows"]:
            _check_keys(r, _ROW_KEYS, f"{where}: row key")
            rows.append(str(r["name"]))
            for col, spec in (r.get("cells") or {}).items():
                spec = spec or {}
                _check_keys(spec, _CELL_KEYS, f"{where}: cell key")
                hidden = bool(spec.get("hidden", False))
                if not hidden and col not in columns:
                    raise UnknownNameError(f"{where}: column of row '{r['name']}'", col, columns)
                paper = spec.get("paper") or []
                if not isinstance(paper, list):
                    raise ValueError(f"{where}: {r['name']}/{col}: paper: expected a list of one "
                                     f"value per network (e.g. ['22.56(0.20)']), got {paper!r}")
                if not hidden and len(paper) not in (0, len(networks)):
                    raise ValueError(f"{where}: {r['name']}/{col}: {len(paper)} paper values "
                                     f"for {len(networks)} networks")
                net = spec.get("net", list(range(len(networks))))
                net = (net,) * len(networks) if isinstance(net, int) else tuple(net)
                config = _deep_merge(r.get("config") or {}, spec.get("config") or {})
                skip = spec.get("skip") or []
                if not isinstance(skip, list) or any(s not in _SCALES for s in skip):
                    raise ValueError(f"{where}: {r['name']}/{col}: skip: expected a list of "
                                     f"scales ({', '.join(_SCALES)}), got {skip!r}")
                if metrics:
                    values: tuple = tuple(PaperMetrics.parse(p, len(metrics)) for p in paper) \
                        or tuple(PaperMetrics.parse(None, len(metrics)) for _ in networks)
                else:
                    values = tuple(PaperValue.parse(p) for p in paper) or \
                        tuple(PaperValue() for _ in networks)
                cells.append(Cell(str(r["name"]), str(col), config, values, net, hidden,
                                  dict(spec.get("scales") or {}), tuple(skip)))
        exp = cls(str(d["name"]), str(d["title"]), str(d.get("source", "")), networks, columns,
                  tuple(rows), tuple(cells), int(d.get("seeds", 5)), dict(d.get("base") or {}),
                  dict(d.get("scales") or {}), str(d.get("notes", "")), metrics)
        exp._check_references(where)
        return exp

    def _check_references(self, where: str) -> None:
        keys = {c.key for c in self.cells}
        for c in self.cells:
            ref = teacher_reference(c.config)
            if ref is not None and ref not in keys:
                raise UnknownNameError(f"{where}: teacher of {c.key}", ref, sorted(keys))


def _metrics(spec: Any, where: str) -> tuple[tuple[str, str], ...]:
    """An experiment's ``metrics``: a mapping name → label, or a list of names (labelled by
    themselves); None: none (a classification table)."""
    if spec is None:
        return ()
    if isinstance(spec, list) and all(isinstance(m, str) for m in spec):
        spec = {m: m for m in spec}
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{where}: metrics: expected a mapping of metric name → column label "
                         f"(e.g. {{rank1: Rank-1}}), got {spec!r}")
    return tuple((str(k), str(v)) for k, v in spec.items())


def teacher_reference(config: dict[str, Any]) -> str | None:
    """``"ROW/COLUMN"`` when the config's ``teacher_weights`` is ``"@ROW/COLUMN"``."""
    t = config.get("teacher_weights")
    return t[1:] if isinstance(t, str) and t.startswith("@") else None


def _check_keys(d: Any, valid: tuple[str, ...], what: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in valid:
            raise UnknownNameError(what, k, valid)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out
