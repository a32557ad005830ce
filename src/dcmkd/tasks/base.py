"""The task seam: what a batch is, how it reaches the device, what is counted while training and
what evaluating a model means (DESIGN.md, "Tasks").

The loop (:mod:`dcmkd.engine.loop`) trains every task the same way; it asks the method's task
(``method.task``, default :class:`~dcmkd.tasks.classification.Classification`) for:

- :meth:`Task.to_device`: a batch ``(inputs, targets)`` moved to the training device;
- :meth:`Task.batch_size`: how many samples a batch holds (the weight of its losses in the
  epoch means);
- :meth:`Task.train_counts`: per-batch sums kept on the device while training (classification:
  the correct predictions of every classifier); the loop divides them by the samples;
- :meth:`Task.evaluate`: the test metrics of every network, a flat ``{key: float}`` record
  (``prefix="val"``: the same metrics of a validation split, keys ``val/…``);
- :meth:`Task.summary` and :meth:`Task.epoch_text`: what the run's ``summary.json`` and the
  epoch's log line say of the evaluated records.

Methods own their losses (a method may use :meth:`Task.criterion`, the supervised loss of a
classifier's logits); the task never sees a loss.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch


class Evaluation(Protocol):
    """What :meth:`Task.evaluate` receives from the loop."""

    device: torch.device
    channels_last: bool
    dist: Any            # dcmkd.engine.distributed.Distributed or None
    out_dir: Any         # the run folder's path (a task may write its raw results there) or None
    quiet: bool          # no progress output (quiet runs, and every rank but 0)

    def autocast(self) -> Any: ...


class Task:
    """Base of every task (see the module note). Subclasses override what differs."""

    #: the registry name, recorded in a run's summary
    name: str = "task"
    #: the summary key of each network's headline test metric, and whether lower is better
    headline: str = "test_metric"
    lower_is_better: bool = True
    #: how the headline metric is named in the log lines (a percentage)
    headline_label: str = "metric"

    # -- batches -------------------------------------------------------------------------------
    def to_device(self, inputs: Any, targets: Any, device: torch.device,
                  channels_last: bool = False) -> tuple[Any, Any]:
        return move(inputs, device, channels_last), move(targets, device)

    def batch_size(self, inputs: Any, targets: Any) -> int:
        return len(targets)

    # -- training ------------------------------------------------------------------------------
    def criterion(self, logits: torch.Tensor, targets: torch.Tensor,
                  label_smoothing: float = 0.0) -> torch.Tensor:
        """The supervised loss of one classifier's logits (classification: cross-entropy)."""
        return torch.nn.functional.cross_entropy(logits, targets,
                                                 label_smoothing=label_smoothing)

    def train_counts(self, outputs: list[list[Any]], targets: Any,
                     names: list[list[str]]) -> dict[str, torch.Tensor]:
        """Device sums over one training batch (divided by the samples in the epoch record)."""
        return {}

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate(self, method: Any, batches: Any, ctx: Evaluation,
                 prefix: str = "test") -> dict[str, float]:
        """The metrics of every network on ``batches``, keys ``{prefix}/net{n}/…`` (``test``;
        ``val`` for a validation split carved from the training set)."""
        raise NotImplementedError

    def network_metric(self, record: dict[str, Any], n: int,
                       prefix: str = "test") -> float | None:
        """Network ``n``'s headline metric in an evaluated record (None: not evaluated);
        ``prefix="val"``: on the validation split."""
        return None

    def summary(self, evaluated: list[dict[str, Any]], networks: int) -> dict[str, Any]:
        """The summary entries of a run from its evaluated records (oldest first)."""
        if not evaluated:
            return {}
        last = evaluated[-1]
        values = [self.network_metric(last, n) for n in range(networks)]
        if any(v is None for v in values):
            return {}
        pick = min if self.lower_is_better else max
        history = [[self.network_metric(r, n) for r in evaluated] for n in range(networks)]
        return {self.headline: values,
                f"best_{self.headline.removeprefix('test_')}": [
                    pick(v for v in h if v is not None) for h in history]}

    def epoch_text(self, record: dict[str, Any], networks: int) -> str | None:
        """The evaluated part of an epoch's log line (None: not evaluated)."""
        values = [self.network_metric(record, n) for n in range(networks)]
        shown = [f"net{n} {v:.2f}" for n, v in enumerate(values) if v is not None]
        return f"test {self.headline.removeprefix('test_')} {' '.join(shown)}" if shown else None

    def result_text(self, summary: dict[str, Any]) -> str:
        """A finished run's result in one line (``dcmkd train``'s last line)."""
        values = summary.get(self.headline) or []
        shown = ", ".join(f"{n} {v:.2f}" for n, v in zip(summary.get("nets", []), values))
        return f"test {self.headline.removeprefix('test_')} {shown}"

    def describe(self) -> dict[str, Any]:
        """What defines the task for a run's config (subclasses add their options)."""
        return {"name": self.name}


def batches_of(batches: Any, ctx: Evaluation) -> Any:
    """The test batches of one evaluation, with progress on long work (a bar on a terminal,
    a line per interval elsewhere, :mod:`dcmkd.progress`)."""
    from dcmkd.progress import track

    return track(batches.epoch(0), total=len(batches), what="evaluating", unit="batch",
                 quiet=getattr(ctx, "quiet", True))


class BatchShard:
    """One data replica's share of evaluation ``batches`` (one process's batches, e.g. a
    :class:`~dcmkd.data.loader.DeviceLoader` or :class:`~dcmkd.data.detection.
    DetectionBatches` built for one process): the whole global batches ``b`` with
    ``b % world_size == rank``, each exactly as one process forms it. A remainder of batches
    that does not split evenly leaves the last ranks one batch short (nothing is padded or
    repeated). :func:`gather_batches` puts the ranks' per-batch results back in the
    single-process order. Other attributes (``dataset``, ``batch_size``) are the wrapped
    batches'."""

    def __init__(self, batches: Any, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.total = len(batches)

    def __len__(self) -> int:
        return len(range(self.rank, self.total, self.world_size))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        """This rank's batches ``start_batch, …`` of ``epoch`` (global batch
        ``rank + k · world_size`` as its ``k``-th)."""
        for b in range(self.rank, self.total, self.world_size)[start_batch:]:
            one = self.batches.epoch(epoch, b)
            try:
                yield next(iter(one))
            finally:
                close = getattr(one, "close", None)
                if close is not None:
                    close()

    def __iter__(self) -> Iterator[Any]:
        return self.epoch(0)

    def __getattr__(self, name: str) -> Any:
        if name == "batches":   # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.batches, name)


def gather_batches(results: list[Any], batches: Any, dist: Any) -> list[Any] | None:
    """Per-batch raw ``results`` of every rank, on rank 0, in the order one process walks the
    batches (None on the other ranks; ``results`` itself in one process). Under torchrun
    ``batches`` must be this replica's :class:`BatchShard` (its ``k``-th result is global
    batch ``rank + k · world_size``). Results should be CPU tensors or plain objects."""
    if dist is None or dist.world == 1:
        return results
    if dist.networks > 1:
        raise ValueError("an evaluation gathered over the processes needs data-parallel "
                         "training (parallel=data)")
    if not isinstance(batches, BatchShard) or \
            (batches.rank, batches.world_size) != (dist.replica, dist.replicas):
        raise ValueError("under torchrun this task evaluates whole batches per process: build "
                         f"its test batches as BatchShard(batches, rank={dist.replica}, "
                         f"world_size={dist.replicas}) (face_data / detection_data do)")
    parts = dist.gather_to_main(list(results))
    if parts is None:
        return None
    world = len(parts)
    return [parts[b % world][b // world] for b in range(batches.total)]


def computed_once(dist: Any, compute: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``compute()`` on rank 0 only (one process: here), its metrics on every rank; an error
    it raises is raised on every rank (``dist.agree``, the engine's distributed context)."""
    return compute() if dist is None else dist.agree(compute)


def move(obj: Any, device: torch.device, channels_last: bool = False) -> Any:
    """``obj`` on ``device``: a tensor (4-D image batches in channels_last when asked), or the
    tensors of a list, tuple or dict (a detection batch: images and box-target dicts)."""
    if isinstance(obj, torch.Tensor):
        obj = obj.to(device, non_blocking=True)
        if channels_last and obj.dim() == 4:
            obj = obj.contiguous(memory_format=torch.channels_last)
        return obj
    if isinstance(obj, dict):
        return {k: move(v, device, channels_last) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device, channels_last) for v in obj)
    return torch.as_tensor(obj).to(device, non_blocking=True)


def sum_over_processes(totals: dict[str, float], count: int, dist: Any
                       ) -> tuple[dict[str, float], int]:
    """Sums of every process under torchrun (one process: unchanged)."""
    if dist is None:
        return totals, count
    totals, count, _ = dist.reduce_sums(totals, count)
    return totals, count


def stacked_read(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Device scalars read to the host in one transfer."""
    keys = list(values)
    if not keys:
        return {}
    return dict(zip(keys, torch.stack([values[k].float() for k in keys]).tolist()))


__all__ = ["Task", "Evaluation", "BatchShard", "gather_batches", "computed_once", "move",
           "sum_over_processes", "stacked_read"]
