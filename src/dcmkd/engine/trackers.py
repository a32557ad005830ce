"""Experiment trackers the user already runs: every epoch record's numbers logged to each.

The run config's ``trackers`` (a list; it does not define the run) names them:

==============  =========================================================================
tensorboard     event files in the run folder's ``tensorboard/`` (also ``tensorboard=true``)
wandb           Weights & Biases: ``wandb.init`` (project ``$WANDB_PROJECT``, else
                ``dcmkd``; the run named after its folder; the run config as its config),
                ``wandb.log`` per epoch, ``wandb.finish``
mlflow          MLflow: ``mlflow.start_run`` (named after the run folder; tracking URI and
                experiment from MLflow's own environment variables), ``mlflow.log_metrics``
                per epoch, ``mlflow.end_run``
==============  =========================================================================

A tracker's package is imported only when it is named; one named but not installed is a
one-line error before training starts (:func:`check_trackers`), naming the pip package. The
numbers of an epoch record (ints and floats: the learning rate, the training losses and
accuracies, the test metrics) are logged with the epoch number (1-based) as the step. A resumed
run opens a new tracker run of the same name and goes on from the epoch it resumes at.
Only rank 0 logs under torchrun (the loop opens the trackers there alone).
"""
from __future__ import annotations

import importlib
import os
import re
from typing import Any, Iterable, Protocol

TRACKERS = ("tensorboard", "wandb", "mlflow")
#: the pip package of each tracker
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
#: the module each tracker imports
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Tracker(Protocol):
    def log(self, numbers: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def tracker_names(trackers: Iterable[str] | str | None, tensorboard: bool = False
                  ) -> tuple[str, ...]:
    """The trackers a run logs to, in order and once each: ``trackers`` (a list, or one string
    of comma-separated names), with ``tensorboard`` added by ``tensorboard=true``; an unknown
    name is a one-line error."""
    if isinstance(trackers, str):
        trackers = [t for t in (s.strip() for s in trackers.split(",")) if t]
    names = list(trackers or ())
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"trackers: unknown tracker {name!r}; choose among "
                             f"{', '.join(TRACKERS)}")
    if tensorboard:
        names.append("tensorboard")
    return tuple(dict.fromkeys(names))


def check_trackers(names: Iterable[str]) -> None:
    """Import each named tracker's module; one not installed is a ``ValueError`` naming its
    pip package (raised before training starts)."""
    for name in names:
        _module(name)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        what = "tensorboard=true" if name == "tensorboard" else f"trackers={name}"
        raise ValueError(f"{what} needs the {PACKAGES[name]} package (pip install "
                         f"{PACKAGES[name]})") from None


def numbers_of(record: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of an epoch record (booleans and texts left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Scalars in the run folder's ``tensorboard/`` (one event file per start)."""

    def __init__(self, folder: str | os.PathLike):
        self.writer = _module("tensorboard").SummaryWriter(str(folder))

    def log(self, numbers: dict[str, float], step: int) -> None:
        for k, v in numbers.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run named after the run folder, with the run config as its config."""

    def __init__(self, name: str, config: dict[str, Any]):
        self.wandb = _module("wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT") or "dcmkd",
                                   name=name, config=config)

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.wandb.log(numbers, step=step)

    def close(self) -> None:
        self.wandb.finish()


#: characters MLflow refuses in a metric name (it takes letters, digits, ``_ - . / :`` and
#: spaces): a face metric ``tar@far=0.01`` is logged as ``tar_far_0.01``
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-./: ]")


class MLflow:
    """An MLflow run named after the run folder (where it goes: MLflow's own settings,
    ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME``)."""

    def __init__(self, name: str):
        self.mlflow = _module("mlflow")
        self.mlflow.start_run(run_name=name)

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({_MLFLOW_BAD.sub("_", k): v for k, v in numbers.items()},
                                step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class Trackers:
    """The run's open trackers: :meth:`log` an epoch record to each, :meth:`close` them all
    (also when leaving a ``with`` block through an error)."""

    def __init__(self, trackers: list[Tracker] | None = None):
        self.trackers = list(trackers or [])

    def log(self, record: dict[str, Any]) -> None:
        numbers = numbers_of(record)
        step = int(record["epoch"])
        for t in self.trackers:
            t.log(numbers, step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_trackers(names: Iterable[str], folder: Any, config: dict[str, Any]) -> Trackers:
    """Open the named trackers for the run folder ``folder`` (a :class:`~dcmkd.run_folder.
    RunFolder`) whose config is ``config``."""
    opened: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoard(folder.file(folder.TENSORBOARD)))
            elif name == "wandb":
                opened.append(WandB(folder.path.name, config))
            elif name == "mlflow":
                opened.append(MLflow(folder.path.name))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


__all__ = ["TRACKERS", "PACKAGES", "Tracker", "Trackers", "tracker_names", "check_trackers",
           "open_trackers", "numbers_of"]
