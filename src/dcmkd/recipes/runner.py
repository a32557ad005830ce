"""Run the missing runs of an experiment, then write its table: ``dcmkd reproduce``.

Runs live in ``OUT/<experiment>/<scale>/<row>/<column>/s<seed>``. Each is an ordinary run folder
(:mod:`dcmkd.engine.trainer`): a finished run is reused, an interrupted one resumes, so calling
:func:`reproduce` again after a crash or with more seeds only trains what is missing. A cell whose
``teacher_weights`` is ``"@ROW/COLUMN"`` gets the first exported network of that cell's run of
the same seed, which is trained first (for a face or detection run, that run's folder: the
exported file's name is the task's network name, and a run folder resolves to it).

A face or detection table (SSKD Tables 7–9) runs its smoke scale on a synthetic dataset of its
task written to ``OUT/<experiment>/smoke/_data`` before the first run (unless ``data.root`` is
given); its cells' ``skip`` leaves a cell out of the scales it names.

With ``jobs > 1`` the missing runs train in that many worker processes at once, each run as soon
as its teacher has finished: on a CPU the cores are split between the workers (several small
runs use a many-core CPU better than one), on a machine with several GPUs each worker takes one
of ``devices``.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from dcmkd.engine.config import dump, merge, parse_override, resolve, validate
from dcmkd.engine.device import pick_device
from dcmkd.engine.trainer import Trainer, check_finished_data
from dcmkd.experiment import Cell, Experiment, _deep_merge, slug, teacher_reference
from dcmkd.methods import METHODS
from dcmkd.recipes.scales import (SCALES, quick_overrides, shorten, smoke_overrides,
                                  smoke_task_overrides, write_smoke_data)
from dcmkd.registry import check_choice
from dcmkd.report import write_experiment_report
from dcmkd.run_folder import RunFolder, network_file
from dcmkd.tasks.build import task_name
from dcmkd.warn import show_one_line

#: the folder, under ``OUT/<experiment>/smoke``, of a task table's synthetic smoke data (a row's
#: folder is a slug, which never starts with ``_``)
SMOKE_DATA = "_data"


@dataclass(frozen=True)
class PlannedRun:
    cell: Cell
    seed: int
    run_dir: Path
    config: dict[str, Any]
    teachers: tuple[Path, ...] = ()   # run folders that must finish first

    @property
    def done(self) -> bool:
        return RunFolder(self.run_dir).finished


def _as_dict(overrides: Sequence[str | dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for o in overrides:
        out = _deep_merge(out, parse_override(o) if isinstance(o, str) else o)
    return out


#: the lowest layer of every reproduced cell: the paper's constant distillation weights (the run
#: config's default ramps them up, see ``dcmkd.methods.mutual.AUTO_RAMPUP``); an experiment or
#: its scale may still set ``loss.rampup`` (quick-cifar10 does)
PAPER_LOSS: dict[str, Any] = {"loss": {"rampup": 0.0}}


def cell_config(exp: Experiment, cell: Cell, seed: int, scale: str = "full",
                overrides: Sequence[str | dict] = (), *, run_dir: Path | None = None,
                standins: bool = False, smoke_data: str | Path | None = None) -> dict[str, Any]:
    """The resolved run config of ``cell`` at ``scale`` for ``seed``.

    Layers, later winning: the paper recipe of the cell's backbones, the experiment's ``base``,
    the row's and cell's ``config``, the scale, the cell's own ``scales`` entry for it, the
    user's ``overrides``, then seed and folder. A change of ``epochs`` (by the scale or the
    user) shortens the schedule with it. ``smoke_data``: the synthetic dataset of a face or
    detection cell at the smoke scale (default ``runs/reproduce/<experiment>/smoke/_data``)."""
    check_choice("scale", scale, SCALES)
    user = _as_dict(overrides)
    full = resolve(_deep_merge(PAPER_LOSS, _deep_merge(exp.base, cell.config)))
    if scale == "quick":
        layer = quick_overrides(exp.scales, full["epochs"])
    elif scale == "smoke" and task_name(full) != "classification":
        root = smoke_data if smoke_data is not None else \
            Path("runs/reproduce") / exp.name / "smoke" / SMOKE_DATA
        layer = _deep_merge(dict(exp.scales.get("smoke") or {}),
                            smoke_task_overrides(task_name(full), full["nets"], standins,
                                                 str(root)))
    elif scale == "smoke":
        layer = smoke_overrides(full["nets"], standins)
    else:
        layer = dict(exp.scales.get("full") or {})
    layer = _deep_merge(_deep_merge(layer, cell.scales.get(scale) or {}), user)
    epochs = validate(dict(full, epochs=layer.pop("epochs", full["epochs"])))["epochs"]
    cfg = merge(shorten(full, epochs), layer)   # a bad epochs named before it is used
    cfg["seed"] = seed
    cfg["out"] = str(run_dir) if run_dir is not None else None
    return validate(cfg)


def plan(exp: Experiment, *, rows: list[str] | None = None, columns: list[str] | None = None,
         seeds: int | Sequence[int] = 1,
         scale: str = "full", out: str | Path = "runs/reproduce",
         overrides: Sequence[str | dict] = (), standins: bool = False) -> list[PlannedRun]:
    """Every run the chosen rows and columns need (their teachers first), in the order they
    will be run: seed by seed, each seed in table order."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    base_dir = Path(out) / exp.name / scale
    runs: list[PlannedRun] = []
    seen: set[tuple[str, int]] = set()
    folders: dict[Path, str] = {}

    def add(cell: Cell, seed: int, chain: tuple[str, ...] = ()) -> PlannedRun:
        if cell.key in chain:
            raise ValueError(f"{exp.name}: circular teacher reference {' → '.join(chain)}")
        run_dir = base_dir / slug(cell.row) / slug(cell.column) / f"s{seed}"
        if folders.setdefault(run_dir, cell.key) != cell.key:
            raise ValueError(f"{exp.name}: cells '{folders[run_dir]}' and '{cell.key}' would share "
                             f"the run folder {run_dir}; rename a row or a column")
        extra: list[dict] = []
        teachers: tuple[Path, ...] = ()
        ref = teacher_reference(cell.config)
        if ref is not None:
            if not exp.runs_at(exp.cell(ref), scale):
                raise ValueError(f"{exp.name}: {cell.key} distils from {ref}, which is not run "
                                 f"at the {scale} scale (its skip)")
            teacher = add(exp.cell(ref), seed, (*chain, cell.key))
            model = teacher.config["nets"][0]
            # a task's network is exported under the task's name for it (a detector's
            # fasterrcnn_resnet101): its run folder, which resolves to that file
            weights = teacher.run_dir / network_file(0, model) \
                if task_name(teacher.config) == "classification" else teacher.run_dir
            extra.append({"teacher_weights": str(weights)})
            teachers = (teacher.run_dir,)
        cfg = cell_config(exp, cell, seed, scale, [*overrides, *extra], run_dir=run_dir,
                          standins=standins, smoke_data=base_dir / SMOKE_DATA)
        run = PlannedRun(cell, seed, run_dir, cfg, teachers)
        if (cell.key, seed) not in seen:
            seen.add((cell.key, seed))
            runs.append(run)
        return run

    for seed in seed_list:
        for cell in exp.select(rows, columns):
            if exp.runs_at(cell, scale):
                add(cell, seed)
    return runs


def write_task_smoke_data(runs: Sequence[PlannedRun], scale: str) -> None:
    """The synthetic dataset of every face or detection run of a smoke reproduction that
    trains on it (its ``data.root`` is the reproduction's ``_data`` folder), written once."""
    if scale != "smoke":
        return
    for root, task in {(r.config["data"]["root"], task_name(r.config)) for r in runs
                       if task_name(r.config) != "classification"}:
        if root and Path(root).name == SMOKE_DATA:
            write_smoke_data(task, root)


# ----------------------------------------------------------------------------- parallel runs

class RunsFailed(RuntimeError):
    """Runs of a parallel reproduction failed (each named with its error)."""


_WORKER: dict[str, Any] = {"devices": None, "threads": None, "nproc": 1}
_PARENT: list[int] = []   # the reproduction that started this worker (set in the worker)


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> threading.Thread:
    """Send this process SIGTERM once ``parent_pid`` is no longer its parent, so a worker whose
    reproduction was killed ends (its run resumes from its last checkpoint, as after any
    SIGTERM) instead of training on unseen and holding its run folder's lock. A daemon thread
    polling ``os.getppid()``: no platform-specific parent-death signal."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def torchrun_ending_with(parent_pid: int, args: Sequence[str]) -> None:
    """torch's own ``torchrun`` (``torch.distributed.run.main``) on ``args``, sent SIGTERM,
    which it passes on to its ranks, once ``parent_pid`` is gone: a killed reproduction ends
    the torchrun it started in its own session."""
    from torch.distributed.run import main

    exit_with_parent(parent_pid)
    main(list(args))


def _init_worker(devices: "mp.Queue[list[str] | None]", threads: int, nproc: int,
                 parent_pid: int) -> None:
    """Worker start-up: end with the parent; take its devices from the queue and its share of
    the CPU."""
    # SIGTERM unwinds (a torchrun child is stopped on the way out) instead of killing outright
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    warnings.showwarning = show_one_line   # the command's one-line warnings
    _PARENT[:] = [parent_pid]
    exit_with_parent(parent_pid)
    _WORKER.update(devices=devices.get(), threads=threads, nproc=nproc)
    torch.set_num_threads(threads)


def _train_in_worker(config: dict[str, Any], run_dir: str) -> float:
    try:  # progress bars of several processes would interleave: quiet
        return train_run(dict(config, quiet=True), Path(run_dir), **_WORKER)
    finally:
        # Orphaned (exit_with_parent's SIGTERM unwound the run, its folder unlocked): leave now.
        # Returning would hand the exception to the pool's worker loop, which would then wait
        # for the next run forever on a queue whose writer is gone.
        if _PARENT and os.getppid() != _PARENT[0]:
            os._exit(128 + signal.SIGTERM)


def train_run(config: dict[str, Any], run_dir: Path, *, nproc: int = 1,
              devices: Sequence[str] | None = None, threads: int | None = None,
              log: Callable[[str], None] | None = None) -> float:
    """Train one planned run; returns its seconds. ``nproc > 1``: under ``torchrun`` on this
    node (``nproc`` processes, data-parallel unless the config says ``parallel``), on
    ``devices`` (one per process) when given; otherwise in this process."""
    t0 = time.perf_counter()
    if nproc == 1:
        cfg = dict(config, device=devices[0]) if devices else config
        Trainer(cfg, run_dir, **({"log": log} if log else {})).fit()
        return time.perf_counter() - t0
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1))
    cfg = dict(config)
    if devices:
        if not all(d.startswith("cuda") for d in devices):
            raise ValueError(f"--nproc-per-run takes CUDA devices, got {list(devices)}")
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(
            [int(d.partition(":")[2] or 0) for d in devices], os.environ.get("CUDA_VISIBLE_DEVICES"))
        cfg["device"] = "cuda"
    with tempfile.TemporaryDirectory(prefix="dcmkd-run-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(dump(cfg))
        # its own session, so that a stopped worker stops torchrun and its processes too;
        # torchrun ends with this process even if it is killed outright
        launch = ("import sys; from dcmkd.recipes.runner import torchrun_ending_with; "
                  "torchrun_ending_with(int(sys.argv[1]), sys.argv[2:])")
        p = subprocess.Popen([sys.executable, "-c", launch, str(os.getpid()), "--standalone",
                              f"--nproc-per-node={nproc}", "-m", "dcmkd.cli", "train", str(path),
                              "-o", str(run_dir), "-q"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, stderr = p.communicate()
        except BaseException:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=60)
            raise
    if p.returncode != 0:
        errors = [line for line in stderr.splitlines() if line.startswith("dcmkd: error:")]
        raise RunsFailed(f"{run_dir}: " + (errors[-1][len("dcmkd: error: "):] if errors else
                                           f"torchrun exited with status {p.returncode}: "
                                           f"{(stderr.strip().splitlines() or [''])[-1]}"))
    return time.perf_counter() - t0


def visible_devices(indices: Sequence[int], inherited: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the GPUs ``cuda:i`` of this process: indices into the list
    this process inherited (a SLURM allocation's ``4,5,6,7``), else physical indices."""
    if not inherited:
        return ",".join(str(i) for i in indices)
    visible = [v.strip() for v in inherited.split(",") if v.strip()]
    for i in indices:
        if not 0 <= i < len(visible):
            raise ValueError(f"cuda:{i} is not among the {len(visible)} GPU(s) of "
                             f"CUDA_VISIBLE_DEVICES={inherited}")
    return ",".join(visible[i] for i in indices)


def relative_cost(run: PlannedRun) -> float:
    """A rough relative training cost (networks × classifiers × epochs) to start the longest
    runs first, so that no long run is left running alone at the end of a parallel pass."""
    cfg = run.config
    aux = cfg["method"] in METHODS and METHODS.get(cfg["method"]).aux
    return len(cfg["nets"]) * (3 if aux else 1) * cfg["epochs"]


def launch_order(todo: Sequence[PlannedRun]) -> list[PlannedRun]:
    """The order a parallel reproduction starts its runs: seed by seed, so that one cut short
    leaves whole seeds (a table whose columns compare) rather than every seed of its costliest
    column; within a seed the costliest first (:func:`relative_cost`), so that no long run is
    left running alone at the end."""
    return sorted(todo, key=lambda r: (r.seed, -relative_cost(r)))


def worker_devices(devices: Sequence[str], worker: int, nproc: int = 1) -> list[str] | None:
    """The devices of worker ``worker``: ``nproc`` consecutive entries of ``devices``
    (cycling), or None (each run's own device)."""
    if not devices:
        return None
    return [devices[(worker * nproc + k) % len(devices)] for k in range(nproc)]


def run_parallel(todo: Sequence[PlannedRun], jobs: int, devices: Sequence[str] = (),
                 log: Callable[[str], None] = print, nproc: int = 1) -> None:
    """Train ``todo`` in ``jobs`` worker processes, each run once its teachers are finished.

    Worker ``i`` uses ``nproc`` entries of ``devices`` (:func:`worker_devices`; default: each
    run's own ``device``) and ``cpu_count // (jobs · nproc)`` threads per process; with
    ``nproc > 1`` a worker trains its runs under torchrun. Runs start in
    :func:`launch_order` (seed by seed, the costliest of a seed first). As in a sequential reproduction, a failed run stops
    the launching of new runs; those already running finish (an interrupted one would resume
    anyway), then :class:`RunsFailed` names the failures."""
    threads = max(1, (os.cpu_count() or 1) // (jobs * nproc))
    ctx = mp.get_context("spawn")  # no fork of a process that may hold CUDA or OpenMP state
    queue = ctx.Queue()
    for i in range(jobs):
        queue.put(worker_devices(devices, i, nproc))
    waiting = launch_order(todo)
    unfinished: set[Path] = {r.run_dir for r in todo}
    running: dict[Future, PlannedRun] = {}
    failures: list[str] = []
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(queue, threads, nproc, os.getpid())) as pool, \
            _stopping_workers_on_interrupt(pool):
        while running or (waiting and not failures):
            for r in [r for r in waiting if not unfinished.intersection(r.teachers)]:
                if len(running) == jobs or failures:
                    break
                waiting.remove(r)
                log(f"start {r.cell.key} seed {r.seed}: {r.config['method']} "
                    f"{'+'.join(r.config['nets'])} → {r.run_dir}")
                running[pool.submit(_train_in_worker, r.config, str(r.run_dir))] = r
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                r = running.pop(future)
                try:
                    seconds = future.result()
                except Exception as e:  # noqa: BLE001 - reported with its run, raised below
                    failures.append(f"{r.run_dir}: {type(e).__name__}: {e}")
                    log(f"FAILED {r.cell.key} seed {r.seed}: {type(e).__name__}: {e}")
                else:
                    unfinished.discard(r.run_dir)
                    log(f"done  {r.cell.key} seed {r.seed} in {seconds:.0f}s")
    if failures:
        raise RunsFailed(f"{len(failures)} run(s) failed, {len(waiting)} not started: "
                           + "; ".join(failures))


@contextlib.contextmanager
def _stopping_workers_on_interrupt(pool: ProcessPoolExecutor) -> Iterator[None]:
    """A SIGINT that reaches the reproduction alone (``kill -INT``; Ctrl-C at a terminal
    reaches the workers too) sends every worker SIGTERM, which stops its run as any SIGTERM does
    (checkpoint kept, folder unlocked), instead of the pool waiting for whole runs to finish.
    The pool keeps its processes in a private attribute, read defensively."""
    try:
        yield
    except BaseException:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, AttributeError):
                process.terminate()
        raise


def reproduce(exp: Experiment, *, rows: list[str] | None = None,
              columns: list[str] | None = None, seeds: int | None = None,
              scale: str = "full", out: str | Path = "runs/reproduce",
              overrides: Sequence[str | dict] = (), standins: bool = False, dry_run: bool = False,
              table_only: bool = False, jobs: int | None = None, devices: Sequence[str] = (),
              nproc_per_run: int = 1, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Train the missing runs, then write ``table.md``, ``table.csv`` and the curves.

    ``dry_run``: list the missing runs, write nothing. ``table_only``: train nothing and write
    the table of the runs finished so far (cells short of their seeds say ``[k/n runs]``; runs
    still training elsewhere are not counted); a ValueError if none is finished.

    ``seeds``: how many (seeds 0..N-1); default the paper's number of runs, 1 for ``smoke``.
    ``jobs``/``devices``: train that many runs at once (:func:`run_parallel`); default one job
    per ``nproc_per_run`` devices of ``devices``, else 1. ``nproc_per_run > 1``: each run under
    torchrun with that many processes (one node).
    Returns the paths written (``table_md``, ``table_csv``, ``curves``)."""
    if nproc_per_run < 1:
        raise ValueError(f"--nproc-per-run must be at least 1, got {nproc_per_run}")
    for device in devices:   # a device that is not there: refused before any worker starts
        pick_device(device)
    jobs = jobs if jobs is not None else max(1, len(devices) // nproc_per_run)
    if jobs < 1:
        raise ValueError(f"-j/--jobs must be at least 1, got {jobs}")
    if standins and scale != "smoke":   # stand-ins would publish another network's numbers
        raise ValueError(f"--standins is for --scale smoke only, not {scale}: it swaps the "
                         "paper's backbones for small ones")

    if seeds is None:
        seeds = 1 if scale == "smoke" else exp.seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1 (seeds 0..N-1), got {seeds}")
    planned = dict(exp=exp, rows=rows, seeds=seeds, scale=scale, out=out, overrides=overrides,
                   standins=standins)
    runs = plan(columns=columns, **planned)
    if not dry_run:
        write_task_smoke_data(runs, scale)
    datasets: dict[str, dict[str, Any] | None] = {}   # the data of each data config, loaded once
    for r in runs:  # a folder holding another config's run, or other data, is refused
        RunFolder(r.run_dir).check(r.config)
        check_finished_data(RunFolder(r.run_dir), r.config, log, datasets)
    shown = runs + (other_columns(runs, plan(columns=None, **planned), log, datasets)
                    if columns is not None else [])
    todo = [r for r in runs if not r.done]
    log(f"{exp.name} ({scale}): {len(runs)} runs, {len(runs) - len(todo)} finished, "
        f"{len(todo)} {'not finished' if table_only else 'to train'}")
    if table_only:  # a finished teacher alone (a hidden cell) puts nothing in the table
        if not any(r.done for r in shown if not r.cell.hidden):
            raise ValueError(f"no run of {exp.name} ({scale}, seeds 0-{seeds - 1}) is finished "
                             f"under {out}: train them first (without --table-only); "
                             "--scale, --seeds, --rows, --columns and --out must be the "
                             "training command's")
    elif dry_run or jobs == 1:
        for i, r in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {r.cell.key} seed {r.seed}: {r.config['method']} "
                f"{'+'.join(r.config['nets'])}, {r.config['epochs']} epochs → {r.run_dir}")
            if not dry_run:
                train_run(r.config, r.run_dir, nproc=nproc_per_run,
                          devices=worker_devices(devices, 0, nproc_per_run),
                          threads=max(1, (os.cpu_count() or 1) // nproc_per_run), log=log)
    elif todo:
        run_parallel(todo, min(jobs, len(todo)), devices, log, nproc_per_run)
    if dry_run:
        return {}
    return write_experiment_report(exp, shown, Path(out) / exp.name / scale, scale=scale)


def other_columns(chosen: Sequence[PlannedRun], every: Sequence[PlannedRun],
                  log: Callable[[str], None],
                  datasets: dict[str, dict[str, Any] | None] | None = None) -> list[PlannedRun]:
    """The runs of ``every`` outside ``chosen`` that the table may show beside them (those
    of the unchosen columns): a folder holding another config's run, or a run on other data,
    is left out, and said (``datasets``: see :func:`check_finished_data`)."""
    mine = {r.run_dir for r in chosen}
    shown = []
    for r in every:
        if r.run_dir in mine:
            continue
        folder = RunFolder(r.run_dir)
        try:
            folder.check(r.config)
            check_finished_data(folder, r.config, log, datasets)
            folder.read_summary()
        except (ValueError, OSError) as e:   # another config or data, a damaged file
            log(f"not in the table: {e}")
            continue
        shown.append(r)
    return shown
