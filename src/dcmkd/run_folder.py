"""The run folder: the one owner of its format. Everything that reads or writes a run (the
training loop, ``dcmkd eval``/``export``, teacher loading, ``dcmkd reproduce``, ``report`` and
``tsne``) goes through :class:`RunFolder`.

A run is a folder::

    config.yaml        what defines the run: the resolved config (or, for a run started from
                       built objects, a description of the method and the settings)
    data.json          what it trains on (:mod:`dcmkd.data.identity`): a run is refused on
                       other data even where the config is the same (``data.root`` may change)
    weights.json       the SHA-256 of the weights files it starts from (``teacher_weights``,
                       ``task.backbone_weights``): a teacher is told by its content
    environment.json   dcmkd, git commit, torch, Python, device
    metrics.jsonl      one JSON line per epoch
    checkpoint.pt      the latest checkpoint (weights_only loading)
    noisy_labels.pt    the corrupted training indices, with label noise
    net{n}_{model}.pt  the trained networks without auxiliary classifiers (plain state_dicts)
    best_net{n}_{model}.pt  with ``data.val_split``: network n at the epoch of its best
                       validation headline metric (never selected on the test set)
    summary.json       written last: its presence means the run is finished
    test_error.png     test error per epoch of each network
    tensorboard/       event files, with ``tensorboard=true``

Every file is written atomically (a temporary file renamed over the old one), so a crash leaves
either the old or the new version. A folder is *new* (no checkpoint, no summary), *interrupted*
(a checkpoint, no summary) or *finished* (a summary). Only the resumable keys (:func:`dcmkd.options.resumable_keys`) may
change between an interruption and its resumption (or for a finished run to be returned);
anything else that differs is refused, naming the keys.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

import torch
from torch import nn

import dcmkd.yamlio as yamlio
from dcmkd.options import added_defaults, location_keys, resumable_keys
from dcmkd.weights import TMP_SUFFIX, atomic_save, atomic_write_text, load_file

#: keys of ``data.json`` that describe the run's use of the data, not the data: never compared
DATA_INFO_KEYS = ("train_images_used", "val_images")

NETWORK_FILE = re.compile(r"net(\d+)_(.+)\.pt")
BEST_FILE = re.compile(r"best_net(\d+)_(.+)\.pt")


class RunConflict(ValueError):
    """The folder holds another run: the message names the differing keys."""


class RunLocked(RuntimeError):
    """Another process is writing this run folder."""


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` → ``{"optim.lr": 0.1}`` (lists become tuples)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def defining(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened keys of ``config`` that define a run: all but the resumable ones
    (:func:`dcmkd.options.resumable_keys`: folder, device, logging…, the keys declared with
    ``run=False``), which may change between an interruption and its resumption, and the keys
    added in a later version while at their default (:func:`dcmkd.options.added_defaults`), so
    a run folder written before a key existed is the same run, under the same hash. A key
    naming where data lives (:func:`dcmkd.options.location_keys`, e.g. ``task.ijba``) counts by
    being set, not by its spelling: the data moved elsewhere is the same run."""
    resumable, added, located = resumable_keys(), added_defaults(), location_keys()
    return {k: (v is not None if k in located else v) for k, v in flatten(config).items()
            if k not in resumable and not (k in added and v == added[k])}


#: config keys (flattened) naming weights files, each with the key that picks a network of a
#: run folder: two spellings of one file (relative or absolute, a run folder or its exported
#: file, a copy elsewhere) are the same value when the files' contents are equal. A run
#: records their SHA-256 in ``weights.json`` when it starts, so that a finished run is told by
#: the content it started from, from any directory and after the file moves.
WEIGHTS_KEYS = {"teacher_weights": "teacher_net", "task.backbone_weights": None}

#: a value that equals no digest: a weights file that cannot be found or read
UNKNOWN = object()


def differences(saved: dict[str, Any], config: dict[str, Any],
                digests: dict[str, Any] | None = None) -> list[str]:
    """Defining keys whose values differ between two configs, as ``key: old → new``. A weights
    file is told by its content, not by the spelling of its path (:data:`WEIGHTS_KEYS`);
    ``digests``: the digests ``saved``'s run recorded (``weights.json``), else the files
    ``saved`` names are read now."""
    a, b = defining(saved), defining(config)
    return [f"{k}: {a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")
            and not (k in WEIGHTS_KEYS and _same_weights(k, a, b, (digests or {}).get(k)))]


def weights_digest(spec: Any, network: Any = None) -> Any:
    """The SHA-256 of the weights file that a config value names (a file, or a run folder's
    exported network: :func:`resolve_weights`): a hex digest for a path, None for null, a
    list of them for a list (one per network); :data:`UNKNOWN` when a file cannot be found or
    read."""
    try:
        return _digest(spec, network)
    except (OSError, ValueError):
        return UNKNOWN


def _digest(spec: Any, network: Any) -> Any:
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return [_digest(s, None) for s in spec]
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"not a path: {spec!r}")
    digest = hashlib.sha256()
    with open(resolve_weights(spec, network), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digests(config: dict[str, Any]) -> dict[str, Any]:
    """The digests of the weights files ``config`` names (:data:`WEIGHTS_KEYS` set to a value
    whose files can be read), by flattened key: what ``weights.json`` records."""
    flat = flatten(config)
    found = {k: weights_digest(flat[k], flat.get(net) if net else None)
             for k, net in WEIGHTS_KEYS.items() if flat.get(k) is not None}
    return {k: v for k, v in found.items() if v is not UNKNOWN}


def _same_weights(key: str, a: dict[str, Any], b: dict[str, Any], recorded: Any) -> bool:
    """Whether flattened configs ``a`` (saved, with the ``recorded`` digest if any) and ``b``
    name the same weights under ``key``: one path spelled two ways, or files of equal
    content."""
    net = WEIGHTS_KEYS[key]
    old, new = a.get(key), b.get(key)
    if old is not None and absolute_path(old) == absolute_path(new) and \
            (net is None or a.get(net) == b.get(net)):
        return True
    have = weights_digest(new, b.get(net) if net else None)
    want = recorded if recorded is not None else weights_digest(old, a.get(net) if net else None)
    return have is not UNKNOWN and want is not UNKNOWN and have == want


def absolute_path(value: Any) -> Any:
    """A path string made absolute (``~`` expanded), a list or tuple element-wise (as a list);
    anything else (None, an empty string, a number) as it is."""
    if isinstance(value, (list, tuple)):
        return [absolute_path(v) for v in value]
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and value \
        else value


def file_safe(model: str) -> str:
    """``model`` as it appears in a file name: the library prefix's ``:`` written ``-``
    (``tv:resnet18`` → ``tv-resnet18``): a colon is not allowed in Windows file names and must
    be quoted in shells. Folders written before keep their names: commands find exported files
    through ``summary.json``."""
    return model.replace(":", "-")


def network_file(index: int, model: str) -> str:
    """The file name of exported network ``index`` (``net0_resnet20.pt``,
    ``net1_tv-resnet18.pt``: :func:`file_safe`)."""
    return f"net{index}_{file_safe(model)}.pt"


def best_file(index: int, model: str) -> str:
    """The file name of network ``index``'s weights at its best validation epoch
    (``best_net0_resnet20.pt``)."""
    return f"best_{network_file(index, model)}"


def parse_network_file(name: str) -> tuple[int, str] | None:
    """``"net1_resnet20.pt"`` → ``(1, "resnet20")``; None for another name. The model part is
    as written (:func:`file_safe`; ``dcmkd.cli`` maps ``tv-resnet18`` back to ``tv:resnet18``)."""
    m = NETWORK_FILE.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def model_name(network: nn.Module) -> str:
    """The name an exported network's file carries: the zoo name, else the class name."""
    backbone = getattr(network, "backbone", network)
    return getattr(backbone, "model_name", None) or type(backbone).__name__.lower()


class RunFolder:
    """One run's folder (see the module note). Creating the object touches nothing on disk."""

    CONFIG = "config.yaml"
    DATA = "data.json"
    WEIGHTS = "weights.json"
    ENVIRONMENT = "environment.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    NOISY_LABELS = "noisy_labels.pt"
    SUMMARY = "summary.json"
    PLOT = "test_error.png"
    TENSORBOARD = "tensorboard"
    LOCK = ".lock"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_depth = 0
        self._told_foreign = False   # the warning on others' files, once per folder object
        self._expected: dict[str, Any] | None = None   # the method's keys → shapes, if known

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- state -------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.file(self.SUMMARY).is_file()

    @property
    def has_checkpoint(self) -> bool:
        return self.file(self.CHECKPOINT).is_file()

    @property
    def is_run(self) -> bool:
        """Whether the folder holds a run (a config)."""
        return self.file(self.CONFIG).is_file()

    def require_run(self, rebuild: str | None = "rebuild") -> "RunFolder":
        """This folder, if it holds a run; ``rebuild`` (what the caller does, e.g. "evaluate"):
        the run must also be one whose method and data dcmkd can rebuild from its config (not
        one that :func:`dcmkd.fit` trained from your own objects), else a one-line error that
        says what to do instead. ``rebuild=None``: any run."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"no run folder at {self.path}")
        if not self.is_run:
            raise FileNotFoundError(f"{self.path} is not a run folder (no {self.CONFIG})")
        if rebuild is not None and self.built_from_objects:
            raise ValueError(self.not_rebuildable(rebuild))
        return self

    @property
    def built_from_objects(self) -> bool:
        """Whether the run was trained by :func:`dcmkd.fit` from built objects: its config
        describes the method and settings (``method``, ``networks``…), not a run config with
        ``nets`` that dcmkd can build again."""
        cfg = self.read_config()
        return cfg is not None and "nets" not in cfg

    def not_rebuildable(self, what: str) -> str:
        """Why dcmkd cannot ``what`` (evaluate, t-SNE…) a run of built objects, and what works."""
        summary = self.read_summary() if self.finished else None
        have = (f"its trained networks are "
                f"{', '.join(self.own_file(n).name for n in summary.get('exported') or [])} (plain "
                "state_dicts: load them into your model)" if summary is not None else
                f"it is not finished: rerun your dcmkd.fit to finish it ({self.CHECKPOINT}'s "
                "'method' entry is your method's state_dict)")
        return (f"cannot {what} {self.path}: dcmkd.fit trained it from your own objects (its "
                f"{self.CONFIG} describes them; dcmkd cannot build that model or data again); "
                + have)

    # -- config ------------------------------------------------------------------------------
    def read_config(self) -> dict[str, Any] | None:
        """The saved config, or None when there is none."""
        path = self.file(self.CONFIG)
        if not path.is_file():
            return None
        data = yamlio.load(path)
        if not isinstance(data, dict):
            raise yamlio.YAMLError(f"{path}: a run config is a mapping of keys")
        return data

    def write_config(self, config: dict[str, Any]) -> None:
        """Write ``config.yaml``, and ``weights.json`` with the digests of the weights files
        it names (:func:`weights_digests`; none: no file)."""
        atomic_write_text(self.file(self.CONFIG), yamlio.dumps(config))
        digests = weights_digests(config)
        if digests:
            atomic_write_text(self.file(self.WEIGHTS), json.dumps(digests, indent=2))

    def read_weights(self) -> dict[str, Any]:
        """The digests ``weights.json`` records (empty for a run without the file: one from
        before it existed, whose weights files are read to compare them)."""
        recorded = read_json(self.file(self.WEIGHTS))
        return recorded if isinstance(recorded, dict) else {}

    def check(self, config: dict[str, Any], data: dict[str, Any] | None = None) -> None:
        """Refuse ``config`` if the folder holds a started or finished run of another config
        (only the resumable keys may differ), or, given ``data`` (the identity of the data
        at hand, :mod:`dcmkd.data.identity`), a run whose ``data.json`` says other data (a run
        without that file, from before it existed, is not compared). A run whose
        ``config.yaml`` was deleted is compared with the config its checkpoint records."""
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"the run folder {self.path} is a file, not a folder")
        if not (self.has_checkpoint or self.finished):
            foreign = [] if self._told_foreign else self.foreign_entries()
            if foreign:   # a log redirected into the folder is common: say it, do not refuse
                self._told_foreign = True
                warnings.warn(f"{self.path} holds files that are not a run's ("
                              f"{', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''}): "
                              "the run's files go beside them", stacklevel=2)
            return
        saved = self.read_config()
        if saved is None and self.has_checkpoint:
            saved = self.checkpoint_config()
        if saved is None:
            raise RunConflict(f"{self.path} holds a run without its {self.CONFIG} (its config "
                              "is unknown); restore the file, or choose another -o/--out")
        state = "a finished" if self.finished else "an interrupted"
        diff = differences(saved, config, self.read_weights())
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            keep = ("the finished run stays there" if self.finished else
                    "or rerun with the run's own settings to resume it")
            raise RunConflict(f"{self.path} holds {state} run with another config ({shown}); "
                              f"choose another -o/--out ({keep})")
        shown = self.data_differences(data) if data is not None else ""
        if shown:
            raise RunConflict(f"{self.path} holds {state} run of the same config on other data "
                              f"({shown}); point data.root at the run's data, or choose another "
                              "-o/--out")

    def data_differences(self, data: dict[str, Any]) -> str:
        """How ``data`` (an identity) differs from the run's ``data.json``, as ``key: old →
        new; …``; empty when they agree or the run has no ``data.json``."""
        saved = self.read_data()
        if isinstance(saved, dict) and isinstance(data, dict):   # informational keys aside
            saved = {k: v for k, v in saved.items() if k not in DATA_INFO_KEYS}
            data = {k: v for k, v in data.items() if k not in DATA_INFO_KEYS}
        if saved is None or saved == data:
            return ""
        return "; ".join(f"{k}: {saved.get(k, '<unset>')!r} → {data.get(k, '<unset>')!r}"
                         for k in sorted(set(saved) | set(data)) if saved.get(k) != data.get(k))

    def foreign_entries(self) -> list[str]:
        """Names in the folder that no run writes (hidden ones left aside)."""
        if not self.path.is_dir():
            return []
        own = {self.CONFIG, self.DATA, self.WEIGHTS, self.ENVIRONMENT, self.METRICS,
               self.CHECKPOINT, self.NOISY_LABELS, self.SUMMARY, self.PLOT, self.TENSORBOARD}
        return sorted(e.name for e in os.scandir(self.path)
                      if e.name not in own and not e.name.startswith(".")
                      and not NETWORK_FILE.fullmatch(e.name) and not BEST_FILE.fullmatch(e.name))

    # -- files written once per run --------------------------------------------------------
    def read_data(self) -> dict[str, Any] | None:
        """The identity of the data the run trains on (``data.json``), or None without one."""
        return read_json(self.file(self.DATA))

    def write_data(self, identity: dict[str, Any]) -> None:
        atomic_write_text(self.file(self.DATA), json.dumps(identity, indent=2))

    def write_environment(self, environment: dict[str, Any]) -> None:
        atomic_write_text(self.file(self.ENVIRONMENT), json.dumps(environment, indent=2))

    def write_noisy_labels(self, indices: torch.Tensor) -> None:
        save_tensors({"indices": indices.cpu()}, self.file(self.NOISY_LABELS))

    # -- metrics -------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.file(self.METRICS)
        if not path.is_file():
            return []
        return [_parse_json(line, path, n) for n, line in
                enumerate(path.read_bytes().splitlines(), 1) if line.strip()]

    def write_metrics(self, history: Sequence[dict[str, Any]]) -> None:
        atomic_write_text(self.file(self.METRICS), "".join(json.dumps(r) + "\n" for r in history))

    # -- checkpoint --------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_tensors(state, self.file(self.CHECKPOINT))

    #: what every run checkpoint holds (a file without one of them is not a run's checkpoint)
    CHECKPOINT_KEYS = ("epoch", "batch", "method", "optimizer", "history")

    def expect_weights(self, state: dict[str, Any]) -> None:
        """Check the ``method`` entry of every checkpoint loaded from now on against ``state``
        (the built method's ``state_dict``): the same keys, tensors of the same shapes, as
        ``load_state_dict`` needs them (:meth:`load_checkpoint`)."""
        self._expected = {k: tuple(v.shape) if isinstance(v, torch.Tensor) and
                          not isinstance(v, nn.parameter.UninitializedTensorMixin) else None
                          for k, v in state.items()}

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint, checked to be this run's: a dict with :data:`CHECKPOINT_KEYS`, a
        ``method`` entry that is a state_dict, the config it records the same as
        ``config.yaml``'s (a copy of another run's checkpoint is named) and, after
        :meth:`expect_weights`, the weights of the method built for the run."""
        path = self.file(self.CHECKPOINT)
        state = load_file(path)
        missing = [k for k in self.CHECKPOINT_KEYS if k not in state] \
            if isinstance(state, dict) else list(self.CHECKPOINT_KEYS)
        if missing:
            held = (f"a {type(state).__name__}" if not isinstance(state, dict) else
                    "only " + ", ".join(map(str, list(state)[:5])) if state else "nothing")
            self._refuse_checkpoint(f"is not a run's checkpoint: it holds {held}, without "
                                    f"{', '.join(missing)}")
        method = state["method"]
        if not isinstance(method, dict) or not method or not all(isinstance(k, str)
                                                                 for k in method):
            what = "empty" if isinstance(method, dict) and not method else \
                "a mapping of other keys" if isinstance(method, dict) else \
                f"a {type(method).__name__}"
            self._refuse_checkpoint(f"is not a run's checkpoint: its 'method' entry is {what}, "
                                    "not the method's state_dict")
        other = self._other_run(state.get("config"))
        if other:
            self._refuse_checkpoint(f"is the checkpoint of another run (its config → this "
                                    f"run's {self.CONFIG}: {other})")
        wrong = mismatch(self._expected, method) if self._expected is not None else ""
        if wrong:
            self._refuse_checkpoint(f"holds the weights of another network ({wrong})")
        return state

    def _refuse_checkpoint(self, what: str) -> None:
        raise ValueError(f"{self.file(self.CHECKPOINT)} {what}; put the run's own "
                         f"{self.CHECKPOINT} back (or move this file away to start the run "
                         "afresh)")

    def _other_run(self, recorded: Any) -> str:
        """How the config a checkpoint records differs from ``config.yaml`` (``key: theirs →
        ours; …``); empty when they agree, or when either is missing or unreadable."""
        own = self.read_config()
        try:
            theirs = json.loads(recorded) if isinstance(recorded, str) else None
        except json.JSONDecodeError:
            theirs = None
        if not isinstance(own, dict) or not isinstance(theirs, dict):
            return ""
        diff = differences(theirs, own)
        return "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")

    def checkpoint_config(self) -> dict[str, Any] | None:
        """The config the checkpoint records (None for a checkpoint that records none)."""
        text = self.load_checkpoint().get("config")
        return json.loads(text) if isinstance(text, str) else None

    # -- one writer at a time --------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the folder's lock (an advisory ``flock`` on ``.lock``, released by the system
        if the process dies). A second writer gets :class:`RunLocked`. A folder this call
        created and that holds nothing else when the lock is released (a failed start) is
        removed. Re-entrant within one :class:`RunFolder` object."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"the run folder {self.path} is a file, not a folder")
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        new_lock = not self.file(self.LOCK).exists()
        try:
            fd = self._take_lock()
        except OSError as e:   # a finished run on a read-only disk: nothing will be written
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM) or not self.finished:
                raise
            self._lock_depth = 1
            try:
                yield self
            finally:
                self._lock_depth = 0
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._lock_depth = 1
            try:
                yield self
            finally:
                self._lock_depth = 0
                self.remove_temporary_files()
        finally:   # traces go while the lock is still held: no one can take a doomed file
            if created and {p.name for p in self.path.iterdir()} <= {self.LOCK}:
                shutil.rmtree(self.path, ignore_errors=True)
                for parent in created[1:]:   # folders made for it, now empty
                    with contextlib.suppress(OSError):
                        parent.rmdir()
            elif new_lock and not (self.is_run or self.has_checkpoint):
                self.file(self.LOCK).unlink(missing_ok=True)   # a refused start: no trace
            os.close(fd)

    def _take_lock(self) -> int:
        """Open ``.lock`` and hold its ``flock``; the descriptor. A holder that removed the
        file (or the folder) on its way out leaves a lock on a file no longer there: then the
        file at the path is locked instead."""
        for _ in range(100):
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.file(self.LOCK), os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunLocked(f"{self.path} is in use by another dcmkd process (pid "
                                f"{holder}); wait for it to end, or choose another "
                                "-o/--out") from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.file(self.LOCK)).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise RunLocked(f"{self.path}: its lock file keeps being replaced; another process is "
                        "starting and removing runs there")

    def discard_start(self) -> None:
        """Remove what a start wrote when it ends before its first checkpoint."""
        if self.has_checkpoint or self.finished:
            return
        for name in (self.CONFIG, self.DATA, self.WEIGHTS, self.ENVIRONMENT, self.NOISY_LABELS,
                     self.METRICS):
            self.file(name).unlink(missing_ok=True)
        for path in self.path.glob("best_net*.pt") if self.path.is_dir() else ():
            if BEST_FILE.fullmatch(path.name):
                path.unlink(missing_ok=True)
        shutil.rmtree(self.file(self.TENSORBOARD), ignore_errors=True)

    # -- exported networks -------------------------------------------------------------------
    def export_networks(self, networks: Iterable[nn.Module], models: Sequence[str],
                        to: str | os.PathLike | None = None) -> list[Path]:
        """Save each network's ``state_dict`` as ``net{n}_{model}.pt`` (in ``to``, default the
        run folder); returns the paths."""
        folder = Path(to) if to is not None else self.path
        paths = []
        for n, (net, model) in enumerate(zip(networks, models)):
            path = folder / network_file(n, model)
            save_tensors(net.state_dict(), path)
            paths.append(path)
        return paths

    def export_best(self, networks: dict[int, nn.Module], models: Sequence[str]) -> list[Path]:
        """Save network ``n``'s ``state_dict`` as ``best_net{n}_{model}.pt`` for each ``n`` of
        ``networks`` (those whose validation metric just improved); returns the paths."""
        paths = []
        for n, net in networks.items():
            path = self.file(best_file(n, models[n]))
            save_tensors(net.state_dict(), path)
            paths.append(path)
        return paths

    def network_path(self, index: int = 0) -> Path:
        """The exported file of network ``index`` of this run."""
        summary = self.read_summary()
        if summary is not None:
            exported = summary.get("exported") or []
            if not 0 <= index < len(exported):
                raise ValueError(f"{self.path} exported {len(exported)} networks; there is no "
                                 f"network {index}")
            return self.own_file(exported[index])
        found = sorted(self.path.glob(f"net{index}_*.pt"))
        if len(found) == 1:
            return found[0]
        if self.has_checkpoint:
            raise ValueError(f"the run in {self.path} is not finished (no exported networks yet)")
        raise FileNotFoundError(f"{self.path} holds no exported network {index} "
                                f"(net{index}_*.pt)")

    def own_file(self, name: Any) -> Path:
        """The file ``name`` that a run's JSON names (``summary.json``'s ``exported``): a plain
        file name in this folder; a path that leads elsewhere (``../``, absolute, a folder) is
        refused, so that a crafted run folder makes no command read outside it."""
        if not isinstance(name, str) or not name or name in (".", "..") or \
                Path(name).name != name or "/" in name or "\\" in name:
            raise ValueError(f"{self.file(self.SUMMARY)} names the file {name!r}, which is "
                             "not a file of the run folder; restore the run's own summary.json")
        return self.file(name)

    # -- summary -----------------------------------------------------------------------------
    def read_summary(self) -> dict[str, Any] | None:
        """The summary, checked against ``metrics.jsonl`` (:meth:`check_summary`)."""
        summary = read_json(self.file(self.SUMMARY))
        if summary is not None:
            self.check_summary(summary)
        return summary

    def check_summary(self, summary: Any) -> None:
        """Refuse a summary that disagrees with what the run recorded epoch by epoch: its
        ``epochs`` with the records of ``metrics.jsonl``, its ``test_top1``/``test_top5`` with
        the last evaluated record and ``best_top1`` with the best one (the same floats: both
        files are written from the same values). A summary edited by hand, or copied from
        another run, is named with the first value that differs."""
        path = self.file(self.SUMMARY)
        if not isinstance(summary, dict):
            raise ValueError(f"{path} is not a run's summary (a JSON object): restore it")
        history = self.read_metrics()
        if not history:
            return
        found: list[str] = []
        if isinstance(summary.get("epochs"), int) and summary["epochs"] != len(history):
            found.append(f"epochs {summary['epochs']} in the summary, {len(history)} records")
        for field, metric, pick in (("test_top1", "top1", "last"), ("test_top5", "top5", "last"),
                                    ("best_top1", "top1", "best")):
            values = summary.get(field)
            if not isinstance(values, list):
                continue
            for n, value in enumerate(values):
                key = f"test/net{n}/C1/{metric}"
                seen = [r[key] for r in history if isinstance(r, dict) and key in r]
                if not seen:
                    continue
                want = seen[-1] if pick == "last" else min(seen)
                if not isinstance(value, (int, float)) or abs(value - want) > 1e-9:
                    found.append(f"{field}[{n}] {value!r} in the summary, {want!r} in "
                                 f"{self.METRICS}")
        if found:
            raise ValueError(f"{path} disagrees with {self.file(self.METRICS)} ({found[0]}): "
                             "one of them was edited or replaced; restore it, or remove "
                             f"{self.SUMMARY} and rerun the same command to write it again "
                             "from the run's final checkpoint")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.file(self.SUMMARY), json.dumps(summary, indent=2))

    def remove_temporary_files(self) -> None:
        """Delete temporary files left by a process killed in the middle of a write."""
        if self.path.is_dir():
            for tmp in self.path.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def deferred_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold back ``signums`` while the block runs, then deliver each one that arrived (once) to
    the handler that was in place. A signal that interrupts ``torch.save`` midway surfaces as
    the zip writer's ``RuntimeError`` rather than as the signal (issue 28 item 5), so a file
    write is made whole first. Only in the main thread (the only one signal handlers run in);
    an ignored signal stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for signum in signums:
            handler = signal.getsignal(signum)
            if handler in (signal.SIG_IGN, None):   # ignored, or set outside Python
                continue
            previous[signum] = handler
            signal.signal(signum, lambda n, _frame: arrived.append(n))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:   # the default action (SIGTERM's: the process ends, its files whole)
                signal.raise_signal(signum)


def mismatch(expected: dict[str, Any], state: dict[str, Any]) -> str:
    """How ``state`` (a ``state_dict`` read from a file) differs from ``expected`` (keys →
    shapes, None for a value of no shape): ``unexpected keys a, b, … (12 in all); missing keys
    …; x.weight is [10, 64] in the file, [100, 64] here``; empty when they match."""
    unexpected = [k for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    shapes = [f"{k} is {list(v.shape)} in the file, {list(expected[k])} here"
              for k, v in state.items() if expected.get(k) is not None
              and isinstance(v, torch.Tensor) and tuple(v.shape) != expected[k]]
    parts = [f"{what} {_some(keys)}" for what, keys in (("unexpected keys", unexpected),
                                                         ("missing keys", missing)) if keys]
    return "; ".join(parts + ([_some(shapes)] if shapes else []))


def _some(items: Sequence[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f", … ({len(items)} in all)" if len(items) > shown
                                       else "")


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (:func:`dcmkd.weights.atomic_save`), with
    SIGINT/SIGTERM held back until the file is whole (:func:`deferred_signals`). A failed write
    of the file (a full disk) is an ``OSError`` naming ``path``: torch's zip writer reports it
    as ``RuntimeError: … unexpected pos …`` with the ``OSError`` only as its context."""
    with deferred_signals():
        try:
            atomic_save(obj, path)
        except RuntimeError as e:
            cause = _os_error_behind(e)
            if cause is None:
                raise
            code = cause.errno or errno.EIO
            raise OSError(code, cause.strerror or os.strerror(code), str(path)) from None


def _os_error_behind(error: BaseException) -> OSError | None:
    """The ``OSError`` in ``error``'s chain of causes and contexts, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def read_json(path: Path) -> Any:
    """A JSON file of a run, None when absent; a damaged one is an error naming it."""
    if not path.is_file():
        return None
    return _parse_json(path.read_bytes(), path)


def _parse_json(text: bytes | str, path: Path, line: int | None = None) -> Any:
    """JSON as a run writes it: no NaN or infinity (a run keeps no non-finite value, so one
    in its files is damage), else an error naming the file (and line)."""
    where = f"{path}" + (f" line {line}" if line else "")
    try:
        return json.loads(text, parse_constant=_non_finite)
    except (json.JSONDecodeError, UnicodeDecodeError, _NonFinite) as e:
        raise ValueError(f"{where} is not valid JSON ({e}): the file is damaged; restore or "
                         "delete it") from None


class _NonFinite(ValueError):
    pass


def _non_finite(name: str) -> Any:
    raise _NonFinite(f"it holds {name}, and a run writes no non-finite value")


def config_hash(config: dict[str, Any]) -> str:
    """8 hex digits of the keys that define a run (:func:`defining`): two configs share it only
    if they define the same run."""
    text = json.dumps(defining(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def default_run_path(config: dict[str, Any]) -> Path:
    """``runs/<method>-<nets>-<data>-s<seed>-<hash>``: the folder of a config run without
    ``out``; the hash of the defining keys keeps runs of other settings apart."""
    nets = "+".join(config["nets"])
    return Path("runs") / (f"{config['method']}-{nets}-{config['data']['name']}-"
                           f"s{config['seed']}-{config_hash(config)}")


def resolve_weights(spec: str | os.PathLike, network: int | None = None) -> Path:
    """The weights file that ``spec`` designates: a file itself, or exported network
    ``network`` (default 0) of a run folder; a file with ``network`` set means that network of
    the file's run folder (``…/kd-run/net0_resnet34.pt`` with ``network=1`` is the student)."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no weights file or run folder at {path}")
    if path.is_file() and network is None:
        return path
    folder = RunFolder(path if path.is_dir() else path.parent)
    return folder.network_path(0 if network is None else int(network))


__all__ = ["RunFolder", "RunConflict", "RunLocked", "config_hash", "flatten", "defining", "differences",
           "network_file", "best_file", "parse_network_file", "model_name", "default_run_path",
           "resolve_weights", "save_tensors", "deferred_signals", "weights_digest",
           "weights_digests", "mismatch", "absolute_path", "WEIGHTS_KEYS"]
