"""How a run is trained, apart from the method and the data: :class:`TrainSettings`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dcmkd.warn import warn
from dcmkd.methods.optimization import AdamWSettings, Schedule, SGDSettings, optimizer_settings
from dcmkd.engine.trackers import tracker_names
from dcmkd.options import check_fields, option

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class LoopOptions:
    """The loop's own options: the run config's top-level keys beside the method's and the
    data's. Under torchrun (:mod:`dcmkd.engine.distributed`) ``parallel`` picks data-parallel
    or one network per rank group."""

    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps", run=False, flag="device")
    precision: str = option("fp32", "fp32 | bf16 | fp16 (autocast; fp16 with loss scaling)",
                            choices=PRECISIONS, flag="precision")
    channels_last: bool | str = option("auto", "memory format of the networks and image "
                                       "batches: true (channels_last), false (the default "
                                       "NCHW) or auto (the one measured faster for the "
                                       "networks' family on the device type, dcmkd.engine."
                                       "layout)", types=(bool, str), choices=("auto",),
                                       run=False)
    compile: bool = option(False, "networks through torch.compile (eager if it fails, with a "
                           "message)", run=False)
    deterministic: bool = option(False, "deterministic algorithms (torch."
                                 "use_deterministic_algorithms)")
    seed: int = option(0, "seed of the initialisation and the batch order", flag="seed")
    checkpoint_every_steps: int = option(0, "steps between checkpoints (0: at the end of every "
                                         "epoch only)", low=0, run=False)
    divergence_factor: float = option(1e3, "stop when the mean loss of a log interval exceeds "
                                      "this multiple of the first interval's twice in a row, as "
                                      "a NaN does (0: off)", low=0, run=False)
    log_every: int = option(50, "steps between the (single, batched) reads of the running "
                            "losses from the device", low=1, run=False)
    eval_every: int = option(1, "epochs between test-set evaluations (the last epoch always)",
                             low=1, run=False)
    quiet: bool = option(False, "no progress output", run=False)
    tensorboard: bool = option(False, "add the tensorboard tracker", run=False)
    trackers: tuple[str, ...] = option((), "experiment trackers of every epoch record: "
                                       "tensorboard | wandb | mlflow (dcmkd.engine.trackers)",
                                       types=(list, str), run=False)
    parallel: str = option("data", "under torchrun: data (data-parallel) or networks (one "
                           "network per rank group)", choices=("data", "networks"), run=False)
    sync_bn: bool = option(False, "BatchNorm statistics over the data replicas")
    dist_timeout: float = option(300.0, "seconds a rank waits for a peer before failing", low=0,
                                 above=True, run=False)


@dataclass(frozen=True)
class TrainSettings(LoopOptions):
    """Everything the loop needs besides the method and the data: the loop's options
    (:class:`LoopOptions`), the optimiser and the schedule.

    ``optim`` and ``schedule`` go to the method (:meth:`~dcmkd.methods.base.Method.
    configure_optimization`; the base gives one SGD following ``schedule`` for
    ``schedule.epochs`` epochs). ``clip_grad_norm`` is the config's ``optim.clip_grad_norm``
    (:class:`~dcmkd.methods.optimization.OptimConfig`).
    """

    optim: SGDSettings | AdamWSettings = option(doc="the optimiser (config: optim)",
                                                factory=SGDSettings)
    schedule: Schedule = option(doc="the rate schedule (config: schedule, optim.lr, epochs)",
                                factory=Schedule)
    clip_grad_norm: float | None = option(None, "max total gradient norm (null: no clipping)",
                                          types=(float, None), low=0, above=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trackers", tracker_names(self.trackers))
        check_fields(self)
        for note in schedule_beyond_run(self.schedule):
            warn(note)

    @property
    def epochs(self) -> int:
        return self.schedule.epochs

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TrainSettings":
        """The settings of a resolved run config (:func:`dcmkd.engine.config.resolve`)."""
        o, s = cfg["optim"], cfg["schedule"]
        simple = {f.name: cfg[f.name] for f in fields(LoopOptions)}
        return cls(
            optim=optimizer_settings(o),
            schedule=Schedule(**{**s, "milestones": tuple(s["milestones"])}, lr=o["lr"],
                              epochs=cfg["epochs"]),
            clip_grad_norm=o["clip_grad_norm"], **simple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schedule"]["milestones"] = list(d["schedule"]["milestones"])
        d["trackers"] = list(d["trackers"])
        return d


def schedule_beyond_run(schedule: Any) -> list[str]:
    """What of ``schedule`` lies at or beyond the run's last epoch and so never acts: a step
    size, absolute milestones (> 1; smaller ones are fractions of the run), a warm-up."""
    out, epochs = [], schedule.epochs
    if schedule.name == "step" and schedule.step_size >= epochs:
        out.append(f"schedule.step_size={schedule.step_size} is not shorter than the run's "
                   f"{epochs} epochs: the rate never drops (shorten it, or use "
                   "schedule.name=cosine)")
    late = [m for m in schedule.milestones if m > 1 and m >= epochs]
    if schedule.name == "multistep" and late:
        out.append(f"schedule.milestones {', '.join(f'{m:g}' for m in late)} lie at or beyond "
                   f"the run's {epochs} epochs: those drops never happen (give epochs < "
                   f"{epochs}, or fractions of the run such as 0.5)")
    if schedule.warmup_epochs and schedule.warmup_epochs >= epochs:
        out.append(f"schedule.warmup_epochs={schedule.warmup_epochs:g} is not shorter than the "
                   f"run's {epochs} epochs: the rate never reaches optim.lr")
    return out


__all__ = ["LoopOptions", "TrainSettings", "PRECISIONS", "schedule_beyond_run"]
