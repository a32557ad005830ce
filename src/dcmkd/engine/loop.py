"""The training loop: ``fit(method, data, run, settings)`` trains any method on any data into a
run folder, resumes it after an interruption, evaluates and exports. Read it top to bottom:
:func:`fit`, then :func:`train_epoch` (with :class:`Step` and :class:`Meter`), :func:`evaluate`
and :func:`finish`.

With a validation split (``data.val_split``, or ``fit(val=…)``), each evaluated epoch also
evaluates it (keys ``val/…``) and :class:`BestOnValidation` keeps each network's weights at its
best validation epoch (``best_net{n}_{model}.pt``); the test set never selects anything, and the
last epoch's results (the papers' tables) are reported as before.

No tensor value is read on the host inside a training step: losses, accuracies and a
non-finite-loss flag accumulate on the device and are read together once per ``log_every`` steps,
at a checkpoint and at the end of an epoch (the progress bar refreshes from those reads).
Autocast covers the forward pass and the loss, not the backward.

Under ``torchrun`` the same loop runs on every rank (:mod:`dcmkd.engine.distributed`): rank 0
alone holds the lock and writes the run folder; decisions (refusals, a finished run, a
divergence) are taken on the reduced figures or broadcast, so every rank takes them together.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Sequence

import torch

from dcmkd.warn import warn
from dcmkd.data.batches import Batches, as_batches
from dcmkd.data.identity import generic_identity
from dcmkd.engine import distributed
from dcmkd.engine.layout import resolve_channels_last
from dcmkd.engine.device import Precision, compile_networks, environment, pick_device
from dcmkd.engine.plots import plot_test_error
from dcmkd.engine.settings import TrainSettings
from dcmkd.engine.trackers import Trackers, check_trackers, open_trackers, tracker_names
from dcmkd.methods.base import Method, StepOutput
from dcmkd.run_folder import RunFolder, best_file, model_name
from dcmkd.tasks import Task, task_of

Log = Callable[[str], None]


class TrainingDiverged(RuntimeError):
    """A loss or a weight became non-finite, or the loss exploded; :func:`fit` adds what was
    kept (the last good checkpoint, or nothing when none had been written)."""


def fit(method: Method, data: Any, run: RunFolder | str, settings: TrainSettings | None = None,
        *, test: Iterable | None = None, val: Iterable | None = None,
        config: dict[str, Any] | None = None, log: Log = print,
        ctx: distributed.Distributed | None = None) -> dict[str, Any]:
    """Train ``method`` on ``data`` into the run folder ``run``; returns the run's summary.

    ``data``: the library's :class:`~dcmkd.data.Data` (train and test loaders), or a
    ``DataLoader`` / any re-iterable of ``(images, labels)`` training batches, with ``test`` the
    same for the test set (no test set: no evaluation). ``val``: validation batches (default:
    ``data.val``, the split ``data.val_split`` carves from the training set), evaluated with the
    test set; a network's weights at its best validation epoch are kept as
    ``best_net{n}_{model}.pt``. ``config``: what defines the run, saved
    as ``config.yaml`` (default: a description of the method and the settings). Rerunning on an
    interrupted folder resumes it; a finished folder returns its summary; a folder holding
    another run is refused (:class:`~dcmkd.run_folder.RunConflict`), and so is a folder another
    process is writing (:class:`~dcmkd.run_folder.RunLocked`). Under ``torchrun`` every rank
    calls it (see :mod:`dcmkd.engine.distributed`); ``ctx``: its distributed context, when the
    caller has created it (:class:`~dcmkd.engine.trainer.Trainer` does, once per run).
    """
    settings = settings or TrainSettings()
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    if ctx is None:
        ctx = distributed.context(settings.parallel, len(method.networks), settings.device,
                                  settings.dist_timeout)
    main = ctx is None or ctx.is_main
    log = log if main and not settings.quiet else (lambda s: None)
    agree(ctx, lambda: check_trackers(tracker_names(settings.trackers, settings.tensorboard)))
    train_batches, test_batches = _split(data, test, settings.seed, ctx, log)
    val_batches = _validation(data, val, settings.seed, ctx, log)
    identity = config if config is not None else describe(method, settings)
    data_identity = getattr(data, "identity", None) or generic_identity(train_batches)
    with run.lock() if main else nullcontext():
        summary = finished_summary(run, ctx, lambda: check_run(run, identity, data_identity),
                                   log)
        if summary is not None:
            return summary
        try:
            return _train(method, train_batches, test_batches, val_batches,
                          getattr(data, "noisy_indices", None), run, settings, identity,
                          data_identity, ctx, log)
        except BaseException as e:
            kept = run.has_checkpoint
            if main:
                run.discard_start()   # a start that wrote no checkpoint leaves nothing behind
            if isinstance(e, TrainingDiverged):   # say what is left of the run
                raise TrainingDiverged(f"{e}; " + (
                    "the last good checkpoint is kept" if kept else
                    "no checkpoint had been written yet, so the run leaves nothing")) from None
            raise


def finished_summary(run: RunFolder, ctx: distributed.Distributed | None,
                     check: Callable[[], bool], log: Log) -> dict[str, Any] | None:
    """The summary of ``run`` when ``check()`` (on rank 0, which raises for a folder of another
    run) says it holds this run finished, on every rank; None otherwise. The one check of a
    finished run, for :func:`fit` and :class:`~dcmkd.engine.trainer.Trainer` (which asks it
    before building anything)."""
    summary = agree(ctx, lambda: run.read_summary() if check() else None)
    if summary is not None:
        log(f"{run}: finished run, not redone")
    return summary


def check_run(run: RunFolder, identity: dict[str, Any],
              data_identity: dict[str, Any] | None = None) -> bool:
    """Refuse another run's folder (another config, or other data); True when the folder
    holds this run, finished."""
    run.check(identity, data_identity)
    return run.finished


def agree(ctx: distributed.Distributed | None, decide: Callable[[], Any]) -> Any:
    """``decide()`` in one process, else :meth:`~dcmkd.engine.distributed.Distributed.agree`."""
    return decide() if ctx is None else ctx.agree(decide)


def _train(method: Method, train_batches: Batches, test_batches: Batches | None,
           val_batches: Batches | None, noisy: torch.Tensor | None, run: RunFolder,
           settings: TrainSettings, identity: dict[str, Any], data_identity: dict[str, Any],
           ctx: distributed.Distributed | None, log: Log) -> dict[str, Any]:
    # -- set up: device, precision, processes, the method's optimisation, the run folder
    device = pick_device(distributed.device_of(ctx, settings.device))
    channels_last = layout_of(method, settings, device)   # (settings keep "auto": rebuilding
    # them would repeat their warnings)
    if settings.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    method.to(device)
    if channels_last:
        method.to(memory_format=torch.channels_last)
    grad_allreduce = ctx is not None and distribute_method(method, ctx, settings, device)
    method.configure_optimization(settings.optim, settings.schedule)
    precision = Precision(settings.precision, device)
    if settings.compile:
        compile_networks(method.networks, log)
    loop = Context(method, run, settings, device, precision, identity,
                   DivergenceGuard(settings.divergence_factor), log, ctx, grad_allreduce,
                   channels_last)
    if loop.main:
        run.write_config(identity)
        run.write_data(data_identity)
        run.write_environment(environment(device))
        if noisy is not None:
            run.write_noisy_labels(noisy)

    # -- resume, or start from the seed (one stream per rank, as timm seeds them)
    epoch, start_batch, history, partial = 0, 0, [], None
    if run.has_checkpoint:
        epoch, start_batch, history, partial = loop.restore(run.load_checkpoint())
        log(f"resuming {run} at epoch {epoch + 1}, batch {start_batch}")
    else:
        torch.manual_seed(settings.seed + (ctx.rank if ctx is not None else 0))
    if ctx is not None:   # every rank must resume from the same checkpoint
        mine = (epoch, start_batch)
        first = ctx.broadcast_object(mine)
        if ctx.min_over_all(float(first == mine)) == 0:
            raise ValueError(f"the processes see different checkpoints in {run} (rank 0: epoch "
                             f"{first[0]}, batch {first[1]}; rank {ctx.rank}: epoch {mine[0]}, "
                             f"batch {mine[1]}): the run folder must be one file system that "
                             "every rank sees alike")
    trackers = open_trackers(tracker_names(settings.trackers, settings.tensorboard), run,
                             identity) if loop.main else Trackers()

    # -- train (evaluating the test set, and the validation split when there is one)
    sets = {k: b for k, b in (("test", test_batches), ("val", val_batches)) if b is not None}
    with trackers:   # closed also when training stops with an error
        while not method.training_done(epoch):
            record = train_epoch(loop, train_batches, epoch, start_batch, partial, history)
            start_batch, partial = 0, None
            loop.sync_replicas()
            last = method.training_done(epoch + 1)   # a phased method knows only after end_epoch
            evaluated = False
            if sets and method.evaluate_epoch(epoch) and \
                    ((epoch + 1) % settings.eval_every == 0 or last):
                record.update(evaluate_sets(method, sets, device, precision, settings, ctx,
                                            run.path))
                evaluated = True
            record.update(method.end_epoch(epoch))
            loop.sync_replicas()   # a next phase may have re-initialised a part on every rank
            if sets and not evaluated and method.training_done(epoch + 1):
                record.update(evaluate_sets(method, sets, device, precision, settings, ctx,
                                            run.path))
            history.append(record)
            loop.keep_best(record)   # before the checkpoint that records it
            loop.checkpoint(epoch + 1, 0, history)
            if loop.main:
                run.write_metrics(history)
            log(epoch_line(record, method))
            if loop.main and (hint := method.advice(epoch, record)):
                warn(hint)
            trackers.log(record)
            epoch += 1
    return finish(loop, history)


def distribute_method(method: Method, ctx: distributed.Distributed, settings: TrainSettings,
                device: torch.device) -> bool:
    """Spread ``method`` over the processes; returns whether the loop must average gradients
    itself (a method whose step does not go through DDP-wrapped networks)."""
    trainable = method.trainable_networks
    if ctx.mode == "networks":
        if settings.precision == "fp16":
            raise ValueError("parallel=networks with precision=fp16: each rank's loss scaler "
                             "would skip steps on its own; use precision=bf16 (no scaling)")
        shapes = [net.num_classifiers for net in method.networks]
        method.shard(ctx.network, lambda own: ctx.gather_logits(own, shapes))
        trainable = [ctx.network]
    if ctx.replicas > 1:
        method.sum_over_replicas = ctx.sum_floats   # a method's own per-epoch statistics
    cuda = device.type == "cuda"
    if settings.sync_bn and ctx.replicas > 1:
        for name, child in method.named_children():   # the method's own layers (a regressor)
            if name != "networks":
                distributed.convert_sync_batchnorm(child, ctx.data_group, cuda)
    for n in trainable:
        if settings.sync_bn and ctx.replicas > 1:
            distributed.convert_sync_batchnorm(method.networks[n], ctx.data_group, cuda)
        if method.routes_networks and ctx.replicas > 1:
            method.route(n, distributed.wrap_data_parallel(ctx, method.networks[n]))
    return not method.routes_networks and ctx.replicas > 1


def train_epoch(ctx: "Context", batches: Batches, epoch: int, start: int,
                partial: dict[str, Any] | None, history: list[dict]) -> dict[str, Any]:
    """One epoch from batch ``start`` (``partial``: the running sums saved at a mid-epoch
    checkpoint); returns the epoch's metrics record."""
    method, settings = ctx.method, ctx.settings
    method.train()
    steps = len(batches)
    task = task_of(method)
    names = [getattr(net, "classifier_names", []) for net in method.networks]
    meter = Meter(ctx.device, names, start, partial, ctx.own_partial(partial), task)
    step = Step(method, ctx.precision, settings.clip_grad_norm,
                ctx.dist if ctx.grad_allreduce else None,
                ctx.dist if ctx.dist is not None and ctx.dist.networks > 1 else None)
    progress = Progress(epoch, steps, start, settings.quiet or not ctx.main, ctx.log, task)
    every = settings.checkpoint_every_steps
    for i, (x, y) in enumerate(batches.epoch(epoch, start), start=start):
        x, y = task.to_device(x, y, ctx.device, ctx.channels_last)
        method.begin_step(epoch + i / steps)
        out = method.training_step(x, y, step, ctx.precision.autocast)
        meter.add(out, y, task.batch_size(x, y))
        if (i + 1) % settings.log_every == 0:
            progress.update(i + 1, ctx.read(meter, epoch, i + 1))
        if every and (i + 1) % every == 0 and i + 1 < steps:
            ctx.read(meter, epoch, i + 1)
            ctx.checkpoint(epoch, i + 1, history, meter.state())
    means = ctx.read(meter, epoch, steps)
    progress.close()
    seconds = meter.seconds()
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": method.lr_at(epoch), "seconds": seconds,
                              "images_per_s": meter.total_samples / max(seconds, 1e-9)}
    record.update(means)
    return record


class Step:
    """``step(loss, terms=None)``, what a method calls to update its networks: zero the
    gradients, back-propagate (scaled for fp16, outside autocast), clip, step the optimiser."""

    def __init__(self, method: Method, precision: Precision, clip: float | None,
                 average_over: distributed.Distributed | None = None,
                 networks_over: distributed.Distributed | None = None):
        """``average_over``: average the gradients over its data replicas (methods not
        routed through DDP); ``networks_over``: network-parallel, where the clipping norm is
        that of every network's gradient, as in one process."""
        self.method, self.scaler, self.clip = method, precision.scaler, clip
        self.average_over, self.networks_over = average_over, networks_over

    def __call__(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        optimizer = self.method.optimizer
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.average_over is not None:   # methods not routed through DDP
            distributed.allreduce_gradients(
                self.average_over, [p for g in optimizer.param_groups for p in g["params"]])
        if self.clip:
            self.scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            if self.networks_over is None:
                torch.nn.utils.clip_grad_norm_(params, self.clip)
            else:   # this rank holds its own network's gradients only
                own = [p.grad for p in params if p.grad is not None]
                norm = self.networks_over.joint_norm(torch.nn.utils.get_total_norm(own))
                torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
        self.scaler.step(optimizer)
        self.scaler.update()


class Meter:
    """Running sums of one training epoch, kept on the device and read in one batch.

    Per named loss ``k``: the batch-size-weighted sum (``train/k``) and the step at which it was
    first non-finite; the task's counts (:meth:`~dcmkd.tasks.base.Task.train_counts`, e.g. the
    correct predictions of every classifier, ``train/net{n}/{C}/acc``). :meth:`read` returns the
    epoch's means so far and raises :class:`TrainingDiverged` naming the first non-finite step
    and its terms. Keys ending in ``/acc`` are counts, the others losses."""

    def __init__(self, device: torch.device, names: list[list[str]], start: int,
                 partial: dict[str, Any] | None = None, share: dict[str, Any] | None = None,
                 task: Task | None = None):
        """``partial``: the running sums of every rank saved at a mid-epoch checkpoint (what
        the last read returned); ``share``: the part of them this rank carries on (default
        all of them, one process); ``task``: what is counted (default classification)."""
        self.device, self.names = device, names
        self.task = task or task_of(None)
        self.sums: dict[str, torch.Tensor] = {}
        self.bad: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.step = torch.full((), start, device=device, dtype=torch.float32)
        self.elapsed, self.t0 = 0.0, time.perf_counter()
        self._last: dict[str, float] = {}
        self._read_samples = 0
        share = partial if share is None else share
        if partial is not None and share is not None:
            self.sums = {k: torch.tensor(v, device=device, dtype=torch.float32)
                         for k, v in share["sums"].items()}
            self.samples, self.elapsed = int(share["samples"]), float(partial["seconds"])
            # the reduced figures of the last read, identical on every rank
            self._last, self._read_samples = dict(partial["sums"]), int(partial["samples"])
        self.total_samples = self._read_samples
        self.interval_loss: float | None = None   # mean summed loss since the previous read
        self.loss_terms: list[str] = []

    def _sum(self, key: str) -> torch.Tensor:
        if key not in self.sums:
            self.sums[key] = torch.zeros((), device=self.device)
        return self.sums[key]

    def add(self, out: StepOutput, targets: Any, size: int | None = None) -> None:
        b = len(targets) if size is None else size
        for k, v in out.losses.items():
            v = v.detach().float()
            self.sums[f"train/{k}"] = self._sum(f"train/{k}") + v * b
            bad = self.bad.get(k)
            if bad is None:
                bad = self.bad[k] = torch.full((), -1.0, device=self.device)
            self.bad[k] = torch.where((bad < 0) & ~torch.isfinite(v), self.step, bad)
        for key, count in self.task.train_counts(out.logits, targets, self.names).items():
            self.sums[key] = self._sum(key) + count
        self.samples += b
        self.step += 1

    def read(self, epoch: int, ctx: distributed.Distributed | None = None) -> dict[str, float]:
        """The epoch's means so far (one host read of every sum and flag; under torchrun
        the sums of every rank)."""
        keys, bad_keys = list(self.sums), list(self.bad)
        values = torch.stack([*(self.sums[k].float() for k in keys),
                              *(self.bad[k] for k in bad_keys)]).tolist() if keys else []
        current = dict(zip(keys, values[:len(keys)]))
        firsts = dict(zip(bad_keys, values[len(keys):]))
        samples = self.samples
        if ctx is not None:
            current, samples, firsts = ctx.reduce_sums(current, self.samples, firsts)
        first = [s for s in firsts.values() if s >= 0]
        if first:
            at = int(min(first))
            terms = [k for k, s in firsts.items() if s == at]
            raise TrainingDiverged(f"non-finite loss at epoch {epoch + 1}, batch {at} in "
                                   f"{', '.join(sorted(terms))}")
        total = sum(v for k, v in current.items() if not k.endswith("/acc"))
        before = sum(v for k, v in self._last.items() if not k.endswith("/acc"))
        fresh = samples - self._read_samples
        self.interval_loss = (total - before) / fresh if fresh else None
        self.loss_terms = [k for k in current if not k.endswith("/acc")]
        self._last, self._read_samples, self.total_samples = current, samples, samples
        return {k: v / max(samples, 1) for k, v in current.items()}

    def state(self) -> dict[str, Any]:
        """The (all ranks') sums of the last :meth:`read`, for a mid-epoch checkpoint."""
        return {"sums": dict(self._last), "samples": self.total_samples,
                "seconds": self.seconds()}

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0


def layout_of(method: Method, settings: TrainSettings, device: torch.device) -> bool:
    """Whether the run uses channels_last: ``settings.channels_last`` (true, false or auto:
    the layout measured faster for the networks on this device type, :mod:`dcmkd.engine.
    layout`)."""
    return resolve_channels_last(settings.channels_last,
                                 [model_name(n) for n in method.networks], device)


def evaluate(method: Method, batches: Batches, device: torch.device, precision: Precision,
             settings: TrainSettings, dist: distributed.Distributed | None = None,
             out_dir: Any = None, prefix: str = "test") -> dict[str, float]:
    """The test metrics of every network, as the method's task defines them
    (:meth:`~dcmkd.tasks.base.Task.evaluate`; classification: top-1 and top-5 error of every
    classifier). Under torchrun each rank evaluates its share and the counts are summed;
    ``out_dir``: where a task may write its raw results (a detector's COCO results JSON);
    ``prefix="val"``: the keys of a validation split (``val/…``)."""
    quiet = settings.quiet or (dist is not None and not dist.is_main)
    ctx = _Evaluation(device, layout_of(method, settings, device), dist, out_dir,
                      precision.autocast, quiet)
    task = task_of(method)
    if prefix == "test":   # (a task of one's own may not take the prefix)
        return task.evaluate(method, batches, ctx)
    return task.evaluate(method, batches, ctx, prefix=prefix)


def evaluate_sets(method: Method, sets: dict[str, Batches], device: torch.device,
                  precision: Precision, settings: TrainSettings,
                  dist: distributed.Distributed | None = None,
                  out_dir: Any = None) -> dict[str, float]:
    """:func:`evaluate` on each set of ``sets`` (``{"test": …, "val": …}``), its keys
    prefixed with the set's name."""
    out: dict[str, float] = {}
    for prefix, batches in sets.items():
        out.update(evaluate(method, batches, device, precision, settings, dist, out_dir,
                            prefix))
    return out


class _Evaluation:
    """What a task's ``evaluate`` receives (:class:`dcmkd.tasks.base.Evaluation`)."""

    def __init__(self, device: torch.device, channels_last: bool,
                 dist: distributed.Distributed | None, out_dir: Any,
                 autocast: Callable[[], Any], quiet: bool = True):
        self.device, self.channels_last, self.dist, self.out_dir = \
            device, channels_last, dist, out_dir
        self.autocast, self.quiet = autocast, quiet


def finish(loop: Context, history: list[dict]) -> dict[str, Any]:
    """Export the networks, plot, and write the summary (last: it marks the run finished);
    under torchrun rank 0 writes and every rank returns the summary."""
    method, run, settings, log = loop.method, loop.run, loop.settings, loop.log
    if loop.dist is not None:
        loop.dist.sync_networks(method.networks)
        for net in method.networks:   # exports hold plain BatchNorm
            distributed.revert_sync_batchnorm(net)
    models = [model_name(net) for net in method.networks]
    exported = method.export()
    for n, net in enumerate(exported):
        check_finite(net.state_dict(), f"exported network {n}", loop.dist)
    if not loop.main:
        return loop.dist.broadcast_object()  # type: ignore[union-attr]
    paths = run.export_networks(exported, models)
    task = task_of(method)
    evaluated = [r for r in history if task.network_metric(r, 0) is not None]
    summary: dict[str, Any] = {
        "method": method.name or type(method).__name__, "nets": models,
        "epochs": len(history), "seed": settings.seed,
        "exported": [p.name for p in paths],
        "seconds": sum(r["seconds"] for r in history),
    }
    if task is not task_of(None):
        summary["task"] = task.name
    summary.update(task.summary(evaluated, len(models)))
    summary.update(loop.best.summary(history, models))
    if evaluated:
        try:
            plot_test_error(history, models, run.file(run.PLOT), task)   # + training loss
        except ImportError:
            log("matplotlib is not installed: no test_error.png")
    run.write_summary(summary)
    if loop.dist is not None:
        loop.dist.broadcast_object(summary)
    return summary


# -- the run's context: checkpoints, reads, divergence ------------------------------------------
class Context:
    """What the loop carries through a run: the method, its folder and settings, the device
    and precision, what defines the run, the divergence guard, the log, the processes
    (``dist``: None in a single process; ``grad_allreduce``: the loop averages gradients) and
    the memory layout the run resolved (``channels_last``)."""

    def __init__(self, method: Method, run: RunFolder, settings: TrainSettings,
                 device: torch.device, precision: Precision, identity: dict[str, Any],
                 guard: "DivergenceGuard", log: Log,
                 dist: distributed.Distributed | None = None, grad_allreduce: bool = False,
                 channels_last: bool = False):
        self.method, self.run, self.settings = method, run, settings
        self.device, self.precision, self.identity = device, precision, identity
        self.guard, self.log = guard, log
        self.dist, self.grad_allreduce = dist, grad_allreduce
        self.channels_last = channels_last
        self.main = dist is None or dist.is_main
        self.best = BestOnValidation(task_of(method), len(method.networks))

    def keep_best(self, record: dict[str, Any]) -> None:
        """Save ``best_net{n}_{model}.pt`` for each network whose validation metric in
        ``record`` is its best so far (rank 0 writes; every rank sees the same reduced
        metrics, so they agree on which)."""
        improved = self.best.update(record)
        if not improved:
            return
        if self.dist is not None:
            self.dist.sync_networks(self.method.networks)
        exported = self.method.export()
        if self.main:
            self.run.export_best({n: exported[n] for n in improved},
                                 [model_name(net) for net in self.method.networks])

    def read(self, meter: "Meter", epoch: int, batch: int) -> dict[str, float]:
        """Read the meter (one host read; under torchrun reduced over the ranks) and apply
        the divergence rule."""
        means = meter.read(epoch, self.dist)
        self.guard.check(meter.interval_loss, meter.loss_terms, epoch, batch)
        return means

    def sync_replicas(self) -> None:
        """Give the data replicas replica 0's weights and buffers (BN statistics each replica
        updated from its own shard; anything a method re-initialised from a rank's own random
        stream, as SSKD's task head), so they evaluate, checkpoint and go on as one."""
        d = self.dist
        if d is None or d.replicas == 1:
            return
        own = self.method if d.network is None else self.method.networks[d.network]
        d.sync_replicas([*own.parameters(), *own.buffers()])

    def own_partial(self, partial: dict | None) -> dict | None:
        """The share of a checkpoint's running sums (every rank's) this rank carries: all of
        them on rank 0 of a replica group, none on the others; in network-parallel training
        only this rank's network's."""
        if partial is None or self.dist is None:
            return partial
        if self.dist.replica != 0:
            return {"sums": {}, "samples": 0, "seconds": partial["seconds"]}
        if self.dist.network is not None:
            prefix = f"train/net{self.dist.network}/"
            return {**partial, "sums": {k: v for k, v in partial["sums"].items()
                                        if k.startswith(prefix)}}
        return partial

    def checkpoint(self, epoch: int, batch: int, history: list[dict],
                   partial: dict | None = None) -> None:
        """Save everything a resumed run needs to continue exactly (``batch`` > 0: mid-epoch,
        with the epoch's running sums in ``partial``); refuses non-finite weights. Under
        torchrun: every network's weights reach rank 0, the optimiser states of
        network-parallel ranks are merged, every rank's RNG state is kept; rank 0 writes."""
        d = self.dist
        if d is not None:
            d.sync_networks(self.method.networks)
        state = self.method.state_dict()
        check_finite(state, f"the weights after epoch {epoch + (batch > 0)}"
                            + (f", batch {batch}" if batch else ""), d)
        optimizer = self.method.optimizer.state_dict()
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        world = 1
        if d is not None:
            if d.network is not None:
                states = d.gather_to_main(_to_cpu(optimizer))
                optimizer = merge_optimizer_states(states) if states is not None else {}
            rng = {"ranks": d.gather_to_main(rng)}
            world = d.world
        if self.main:
            self.run.save_checkpoint({
                "epoch": epoch, "batch": batch, "method": state, "optimizer": optimizer,
                "scaler": self.precision.scaler.state_dict(), "rng": rng,
                "history": json.dumps(history), "partial": json.dumps(partial),
                "guard": json.dumps(self.guard.state()), "config": json.dumps(self.identity),
                "best": json.dumps(self.best.state()),
                "world_size": world})

    def restore(self, ckpt: dict[str, Any]) -> tuple[int, int, list[dict], dict | None]:
        """Load a checkpoint; returns (epoch, batch, history, the epoch's partial sums). A run
        checkpointed at another world size resumes with the same weights, optimiser and data
        order; the random streams of the ranks are seeded afresh (said in the log)."""
        self.method.load_state_dict(ckpt["method"])   # a phased method restores its phase first
        self.method.optimizer.load_state_dict(ckpt["optimizer"])
        self.precision.scaler.load_state_dict(ckpt["scaler"])
        rank = self.dist.rank if self.dist is not None else 0
        world = self.dist.world if self.dist is not None else 1
        ranks = ckpt["rng"].get("ranks", [ckpt["rng"]])
        saved_world = int(ckpt.get("world_size", len(ranks)))
        if saved_world == world:
            rng = ranks[rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            torch.manual_seed(self.settings.seed + rank + 1000 * int(ckpt["epoch"]))
            self.log(f"checkpointed with {saved_world} process(es), resumed with {world}: the "
                     "weights, optimiser state and data order are the same; each rank's random "
                     "stream (dropout) is seeded afresh, and a loader that augments per rank "
                     "(a streamed dataset) crops differently")
        self.guard.load_state(json.loads(ckpt.get("guard") or "{}"))
        self.best.load_state(json.loads(ckpt.get("best") or "{}"))
        partial = json.loads(ckpt.get("partial") or "null")
        return int(ckpt["epoch"]), int(ckpt["batch"]), json.loads(ckpt["history"]), partial


def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def merge_optimizer_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One optimiser state from the ranks of network-parallel training: every rank built the
    same optimiser over every network and holds the state of its own network's parameters
    only, so the states are disjoint and their union is the single-process state."""
    merged = {"state": {}, "param_groups": states[0]["param_groups"]}
    for s in states:
        merged["state"].update(s["state"])
    return merged


def check_finite(state: dict[str, torch.Tensor], what: str,
                 dist: distributed.Distributed | None = None) -> None:
    """Raise :class:`TrainingDiverged` if a floating tensor of ``state`` holds a NaN or an
    infinity (one host read; a second pass names the tensors). Under torchrun every rank
    raises when any rank finds one."""
    floats = [(k, v) for k, v in state.items()
              if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel()]
    ok = not floats or bool(torch.stack([torch.isfinite(v).all() for _, v in floats]).all())
    if dist is not None:
        ok = dist.min_over_all(float(ok)) > 0
    if ok:
        return
    bad = [k for k, v in floats if not bool(torch.isfinite(v).all())] or ["on another rank"]
    raise TrainingDiverged(f"non-finite values in {what} ({', '.join(bad[:3])}"
                           f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); nothing "
                           "was saved")


class DivergenceGuard:
    """Stops a run whose loss explodes without becoming NaN: the mean loss of a log interval
    (the sum of the method's terms) above ``factor`` × its reference for two reads in a row.
    The reference is the mean of the first read of the same objective (the same loss terms: a
    phased method such as SSKD starts a new reference with each stage); ``factor = 0``
    disables the rule."""

    PATIENCE = 2

    def __init__(self, factor: float):
        self.factor = float(factor)
        self.references: dict[str, float] = {}
        self.strikes = 0

    def check(self, loss: float | None, terms: Sequence[str], epoch: int, batch: int) -> None:
        if not self.factor or loss is None:
            return
        key = "|".join(sorted(terms))
        if key not in self.references:
            self.references[key] = max(abs(loss), 1e-8)
            return
        reference = self.references[key]
        self.strikes = self.strikes + 1 if loss > self.factor * reference else 0
        if self.strikes >= self.PATIENCE:
            raise TrainingDiverged(
                f"the loss exploded: {loss:.4g} at epoch {epoch + 1}, batch {batch}, more than "
                f"{self.factor:g}× its start ({reference:.4g}) for {self.PATIENCE} log "
                "intervals in a row (rerun with a lower optim.lr, into another -o/--out if "
                "you gave one: this folder keeps the diverged run; or set divergence_factor=0 "
                "to disable this rule)")

    def state(self) -> dict[str, Any]:
        return {"references": self.references, "strikes": self.strikes}

    def load_state(self, state: dict[str, Any]) -> None:
        self.references = dict(state.get("references") or {})
        self.strikes = int(state.get("strikes", 0))


class BestOnValidation:
    """Per network, the epoch of its best validation headline metric so far (the task's,
    e.g. classification's top-1 error of C1 on ``val/…``; lower or higher is better as the task
    says) and that value. **Choice** (no paper selects checkpoints): a tie keeps the earlier
    epoch; only evaluated epochs compete (``eval_every``). Its state goes into the checkpoint,
    so a resumed run selects as an uninterrupted one."""

    def __init__(self, task: Task, networks: int):
        self.task = task
        self.epochs: list[int | None] = [None] * networks
        self.values: list[float | None] = [None] * networks

    def update(self, record: dict[str, Any]) -> list[int]:
        """The networks whose validation metric in ``record`` beats their best so far."""
        improved = []
        for n, best in enumerate(self.values):
            v = self.task.network_metric(record, n, "val") if any(
                k.startswith("val/") for k in record) else None
            if v is None:
                continue
            if best is None or (v < best if self.task.lower_is_better else v > best):
                self.epochs[n], self.values[n] = int(record["epoch"]), float(v)
                improved.append(n)
        return improved

    def summary(self, history: list[dict[str, Any]], models: list[str]) -> dict[str, Any]:
        """``best_epoch``, the last and the best validation metric (``val_top1``,
        ``best_val_top1``), the test metric at the best epoch (``test_top1_at_best_epoch``,
        None where that epoch was not tested) and ``best_exported``; nothing without a
        validation split."""
        if all(e is None for e in self.epochs):
            return {}
        name = self.task.headline.removeprefix("test_")
        by_epoch = {r.get("epoch"): r for r in history}
        validated = [r for r in history if any(k.startswith("val/") for k in r)]
        last = validated[-1] if validated else {}
        return {
            "best_epoch": self.epochs,
            f"val_{name}": [self.task.network_metric(last, n, "val")
                            for n in range(len(self.epochs))],
            f"best_val_{name}": self.values,
            f"test_{name}_at_best_epoch": [
                None if e is None else self.task.network_metric(by_epoch.get(e, {}), n)
                for n, e in enumerate(self.epochs)],
            "best_exported": [None if e is None else best_file(n, models[n])
                              for n, e in enumerate(self.epochs)]}

    def state(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "values": self.values}

    def load_state(self, state: dict[str, Any]) -> None:
        if state:
            self.epochs, self.values = list(state["epochs"]), list(state["values"])


# -- what a run of built objects is ------------------------------------------------------------
def describe(method: Method, settings: TrainSettings) -> dict[str, Any]:
    """The ``config.yaml`` of a run started from built objects: the method
    (:meth:`~dcmkd.methods.base.Method.describe`), its networks (names and parameter counts)
    and the settings."""
    return {"method": method.describe(),
            "networks": [model_name(net) for net in method.networks],
            "parameters": [sum(p.numel() for p in net.parameters()) for net in method.networks],
            **settings.to_dict()}


# -- logging --------------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) one line per log interval."""

    def __init__(self, epoch: int, steps: int, start: int, quiet: bool, log: Log,
                 task: Task | None = None):
        self.epoch, self.steps, self.log, self.t0, self.start = epoch, steps, log, \
            time.perf_counter(), start
        self.bar = None
        self.enabled = not quiet
        if self.enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}", leave=False,
                            dynamic_ncols=True)

    def update(self, done: int, means: dict[str, float]) -> None:
        if not self.enabled:
            return
        loss = sum(v for k, v in means.items() if not k.endswith("/acc"))
        acc = means.get("train/net0/C1/acc", means.get("train/net1/C1/acc"))
        rate = (done - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        fields = {"loss": f"{loss:.3f}", "acc": "-" if acc is None else f"{acc:.3f}",
                  "batch_s": f"{rate:.1f}"}
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(**fields)
        else:
            self.log(f"epoch {self.epoch + 1} [{done}/{self.steps}] " +
                     " ".join(f"{k} {v}" for k, v in fields.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def epoch_line(r: dict[str, Any], method: Method) -> str:
    total = method.planned_epochs
    head = f"epoch {r['epoch']}/{total or '?'} lr {r['lr']:.4g} "
    tail = f"({r['seconds']:.1f}s, {r['images_per_s']:.0f} img/s)"
    task = task_of(method)
    if any(k.startswith("val/") for k in r):   # a validation split: its headline first
        values = [task.network_metric(r, n, "val") for n in range(len(method.networks))]
        tail = (f"val {task.headline_label} " + " ".join(
            f"net{n} {v:.2f}%" for n, v in enumerate(values) if v is not None) + f" {tail}")
    tested = task.epoch_text(r, len(method.networks))
    if tested is None:   # not evaluated: the training losses
        losses = " ".join(f"{k[6:]} {v:.4g}" for k, v in r.items()
                          if k.startswith("train/") and not k.endswith("/acc"))
        return head + f"{losses} {tail}"
    return head + f"{tested} {tail}"


# -- helpers --------------------------------------------------------------------------------------
def _split(data: Any, test: Iterable | None, seed: int,
           ctx: distributed.Distributed | None = None, log: Log = print
           ) -> tuple[Batches, Batches | None]:
    """(train, test) batches from the library's ``Data`` or a training iterable + ``test``;
    under torchrun the library's loaders must be sharded over the data replicas."""
    if hasattr(data, "train") and hasattr(data, "test") and test is None:
        train, evaluation = (as_batches(data.train, seed, "data.train"),
                             as_batches(data.test, seed, "data.test"))
    else:
        train, evaluation = as_batches(data, seed, "data"), (None if test is None else
                                                             as_batches(test, seed, "test"))
    if ctx is not None:
        for b in (train, evaluation):
            _check_shard(b, ctx, log, b is train)
    if len(train) == 0:
        size, batch = getattr(train, "num_samples", "?"), getattr(train, "batch_size", "?")
        raise ValueError(f"the training set ({size} samples) holds no full batch of {batch}: no "
                         "training step would run (lower data.batch_size, or use more data)")
    return train, evaluation


def _validation(data: Any, val: Iterable | None, seed: int,
                ctx: distributed.Distributed | None = None, log: Log = print
                ) -> Batches | None:
    """The validation batches: ``val``, else the library's ``Data.val`` (``data.val_split``);
    None without a validation split."""
    source, what = (val, "val") if val is not None else (getattr(data, "val", None), "data.val")
    if source is None:
        return None
    batches = as_batches(source, seed, what)
    if ctx is not None:
        _check_shard(batches, ctx, log, False)
    return batches


def _check_shard(batches: Batches | None, ctx: distributed.Distributed, log: Log,
                 train: bool) -> None:
    """Under torchrun each data replica must read its own share: the library's loaders built
    with this replica's rank and world size; a ``DataLoader`` with a ``DistributedSampler``
    (for training; an unsharded test set is only evaluated several times over)."""
    if batches is None:
        return
    sampler = getattr(getattr(batches, "iterable", None), "sampler", None)
    if hasattr(batches, "world_size"):
        where = (batches.rank, batches.world_size)   # type: ignore[attr-defined]
    elif isinstance(sampler, torch.utils.data.DistributedSampler):
        where = (sampler.rank, sampler.num_replicas)
    elif not train or ctx.replicas == 1:
        return
    elif isinstance(getattr(batches, "iterable", None), torch.utils.data.DataLoader):
        raise ValueError("under torchrun every data replica would read the same batches: give "
                         f"the training DataLoader a DistributedSampler(dataset, "
                         f"num_replicas={ctx.replicas}, rank={ctx.replica})")
    else:
        log("the training batches do not say how they are split over the processes: each data "
            "replica must give different batches (the global batch is their union)")
        return
    if where != (ctx.replica, ctx.replicas):
        raise ValueError(f"the data are split as rank {where[0]} of {where[1]} but this process "
                         f"is data replica {ctx.replica} of {ctx.replicas}: build them with "
                         f"rank={ctx.replica}, world_size={ctx.replicas}")


__all__ = ["fit", "evaluate", "TrainingDiverged", "Step", "Meter", "describe"]
