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
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dcmkd.registry import UnknownNameError

_EXPERIMENT_KEYS = ("name", "title", "source", "networks", "columns", "seeds", "base", "scales",
                    "rows", "notes")
_ROW_KEYS = ("name", "config", "cells")
_CELL_KEYS = ("config", "paper", "net", "hidden", "scales")
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
class Cell:
    row: str
    column: str
    config: dict[str, Any]          # overrides of this cell, merged over base and row
    paper: tuple[PaperValue, ...]   # one per reported network
    net: tuple[int, ...]            # index into the run's networks, per reported network
                                    # (-1: none, for ``dcmkd report``'s narrower runs)
    hidden: bool = False
    scales: dict[str, dict[str, Any]] = field(default_factory=dict)  # this cell's, per scale

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

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "experiment") -> "Experiment":
        _check_keys(d, _EXPERIMENT_KEYS, f"{where}: experiment key")
        for k in ("name", "title", "columns", "rows"):
            if k not in d:
                raise ValueError(f"{where}: missing '{k}'")
        networks = tuple(d.get("networks") or ("Net1",))
        columns = tuple(d["columns"])
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
                cells.append(Cell(str(r["name"]), str(col), config,
                                  tuple(PaperValue.parse(p) for p in paper) or
                                  tuple(PaperValue() for _ in networks), net, hidden,
                                  dict(spec.get("scales") or {})))
        exp = cls(str(d["name"]), str(d["title"]), str(d.get("source", "")), networks, columns,
                  tuple(rows), tuple(cells), int(d.get("seeds", 5)), dict(d.get("base") or {}),
                  dict(d.get("scales") or {}), str(d.get("notes", "")))
        exp._check_references(where)
        return exp

    def _check_references(self, where: str) -> None:
        keys = {c.key for c in self.cells}
        for c in self.cells:
            ref = teacher_reference(c.config)
            if ref is not None and ref not in keys:
                raise UnknownNameError(f"{where}: teacher of {c.key}", ref, sorted(keys))


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
