"""How a run is trained, apart from the method and the data: :class:`TrainSettings`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dcmkd.warn import warn
from dcmkd.methods.optimization import AdamWSettings, Schedule, SGDSettings, optimizer_settings
from dcmkd.engine.trackers import tracker_names
from dcmkd.registry import check_choice

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs besides the method and the data.

    ``optim`` and ``schedule`` go to the method (:meth:`~dcmkd.methods.base.Method.
    configure_optimization`; the base gives one SGD following ``schedule`` for
    ``schedule.epochs`` epochs). ``log_every``: steps between the (single, batched) reads of the
    running losses and accuracies from the device; the progress bar refreshes from those reads.
    ``eval_every``: epochs between test-set evaluations (the last epoch is always evaluated).
    ``compile``: the networks run through ``torch.compile`` (eager if it fails, with a message).
    ``trackers``: experiment trackers that log every epoch record (:mod:`dcmkd.engine.trackers`:
    tensorboard, wandb, mlflow; ``tensorboard=true`` adds tensorboard).
    ``divergence_factor``: a run whose mean loss over a log interval exceeds this multiple of
    its first interval's for two intervals in a row stops like a NaN does (0 disables).
    ``clip_grad_norm`` (the config's ``optim.clip_grad_norm``; beyond the paper, which does not
    clip): the total gradient norm over every parameter the optimiser holds is rescaled to at
    most this before each step, the gradient-norm clipping of Pascanu et al. (2013); offered
    against the early spike of DCM's summed distillation gradient (README, "DCM on a small
    budget").
    """

    optim: SGDSettings | AdamWSettings = field(default_factory=SGDSettings)   # optim.name
    schedule: Schedule = field(default_factory=Schedule)
    clip_grad_norm: float | None = None   # max total gradient norm (None: no clipping)
    device: str = "auto"                  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"               # fp32 | bf16 | fp16 (autocast; fp16 with loss scaling)
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    checkpoint_every_steps: int = 0       # 0: at the end of every epoch only
    divergence_factor: float = 1e3        # stop when the loss exceeds this × its start (0: off)
    log_every: int = 50
    eval_every: int = 1
    quiet: bool = False
    tensorboard: bool = False
    trackers: tuple[str, ...] = ()        # tensorboard | wandb | mlflow (dcmkd.engine.trackers)
    # under torchrun (dcmkd.engine.distributed): data-parallel, or one network per rank group
    parallel: str = "data"                # data | networks
    sync_bn: bool = False                 # BatchNorm statistics over the data replicas
    dist_timeout: float = 300.0           # seconds a rank waits for a peer before failing

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        object.__setattr__(self, "trackers", tracker_names(self.trackers))
        for name in ("log_every", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.checkpoint_every_steps < 0:
            raise ValueError(f"checkpoint_every_steps must be ≥ 0, got "
                             f"{self.checkpoint_every_steps}")
        check_choice("parallel", self.parallel, ("data", "networks"))
        if self.dist_timeout <= 0:
            raise ValueError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.divergence_factor < 0:
            raise ValueError(f"divergence_factor must be ≥ 0, got {self.divergence_factor}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"optim.clip_grad_norm must be > 0 (or null), got "
                             f"{self.clip_grad_norm}")
        for note in schedule_beyond_run(self.schedule):
            warn(note)

    @property
    def epochs(self) -> int:
        return self.schedule.epochs

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TrainSettings":
        """The settings of a resolved run config (:func:`dcmkd.engine.config.resolve`)."""
        o, s = cfg["optim"], cfg["schedule"]
        simple = {f.name: cfg[f.name] for f in fields(cls)
                  if f.name not in ("optim", "schedule", "clip_grad_norm")}
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


__all__ = ["TrainSettings", "PRECISIONS", "schedule_beyond_run"]
