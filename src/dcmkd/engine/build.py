"""From a run config to what the loop trains: the one config path of ``dcmkd train``, the
recipes, ``dcmkd eval``/``export`` and :class:`~dcmkd.engine.trainer.Trainer`."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dcmkd.data import Data, DataConfig, build_data
from dcmkd.engine import distributed
from dcmkd.engine.config import ConfigError, resolve
from dcmkd.engine.device import Precision, pick_device
from dcmkd.engine.loop import evaluate
from dcmkd.engine.settings import TrainSettings
from dcmkd.methods import Method, create_method, needs_teacher
from dcmkd.methods.optimization import OPTIMIZERS
from dcmkd.models.base import official_init
from dcmkd.registry import UnknownNameError
from dcmkd.run_folder import RunFolder
from dcmkd.tasks.build import build_task, task_name


@dataclass
class Built:
    """A config, built: the method, its data and the loop's settings."""

    method: Method
    data: Data
    settings: TrainSettings


def build_method(cfg: dict[str, Any], num_classes: int) -> Method:
    """The method of a resolved config (seeded with ``cfg["seed"]`` for the weights' init). A
    method that distils from a teacher needs ``teacher_weights``: a run from a random teacher
    means nothing, so it is refused (the Python API only warns)."""
    if needs_teacher(cfg["method"]) and not cfg["teacher_weights"]:
        raise ConfigError(f"method '{cfg['method']}' needs teacher_weights: the trained "
                          "teacher's weights file or finished run folder (e.g. "
                          "teacher_weights=runs/teacher)")
    torch.manual_seed(cfg["seed"])
    method = create_method(
        cfg["method"], cfg["nets"], num_classes, classifiers=cfg["classifiers"],
        kind=cfg["aux_kind"], model_options=cfg["model_options"] or None,
        teacher_weights=cfg["teacher_weights"], teacher_net=cfg["teacher_net"],
        sskd=cfg["sskd"], feature=cfg["feature"], **cfg["loss"])
    if cfg["init"] == "official":   # the trainable networks only: a teacher keeps its weights
        for n in method.trainable_networks:
            official_init(method.networks[n])
    return method


def build(cfg: dict[str, Any], ctx: distributed.Distributed | None = None) -> Built:
    """Data, method and settings of a resolved config (:func:`dcmkd.engine.config.resolve`).
    ``ctx``: the process's distributed context, if the caller has created it (else created
    here: :func:`dcmkd.engine.distributed.context`)."""
    if cfg["optim"]["name"] not in OPTIMIZERS:
        raise UnknownNameError("optimizer", cfg["optim"]["name"], OPTIMIZERS)
    settings = TrainSettings.from_config(cfg)
    if ctx is None:
        ctx = distributed.context(settings.parallel, len(cfg["nets"]), settings.device,
                                  settings.dist_timeout)
    device = pick_device(distributed.device_of(ctx, settings.device))
    torch.manual_seed(cfg["seed"])
    if task_name(cfg) != "classification":   # face / detection (dcmkd.tasks)
        method, task_data = build_task(cfg, device, ctx)
        return Built(method, task_data, settings)  # type: ignore[arg-type]
    shard = {"rank": ctx.replica, "world_size": ctx.replicas} if ctx is not None else {}
    data = distributed.in_turn(ctx, lambda: build_data(DataConfig.from_dict(cfg["data"]),
                                                       device, cfg["seed"], **shard))
    if cfg["num_classes"] is not None and cfg["num_classes"] < data.num_classes:
        raise ConfigError(f"num_classes: {cfg['num_classes']} is fewer than the "
                          f"{data.num_classes} classes of the data ({data.name}); leave it "
                          "unset for the data's own")
    method = build_method(cfg, cfg["num_classes"] or data.num_classes)
    return Built(method, data, settings)


def load_run(run: RunFolder | str | Path, **overrides: Any) -> Built:
    """A run folder's method with its latest weights (from its checkpoint), its data and its
    settings, e.g. to evaluate or export it. ``overrides``: config keys (``device="cpu"``;
    ``quiet=False`` shows the progress of long work, the default is quiet). Data other than
    the run's ``data.json`` says is used with a warning (evaluating a run on another copy or
    version of its data can be what one wants). A checkpoint that is not the run's (another
    run's, another network's weights) is one error naming it."""
    run = run if isinstance(run, RunFolder) else RunFolder(run)
    cfg = resolve(run.require_run().read_config(), [{"quiet": True, **overrides}])
    if not run.has_checkpoint:
        hint = ("evaluate its exported networks one by one (dcmkd eval FILE)"
                if run.finished else "train it first")
        raise ValueError(f"{run} holds no {RunFolder.CHECKPOINT}, so no weights of its "
                         f"method: {hint}")
    with warnings.catch_warnings():   # the schedule's notes were the training's to say
        warnings.filterwarnings("ignore", message=r"schedule\.")
        built = build(cfg)
    warn_if_other_data(run, built.data)
    run.expect_weights(built.method.state_dict())
    ckpt = run.load_checkpoint()
    built.method.load_state_dict(ckpt["method"])
    if not run.finished:
        warnings.warn(f"{run} is not finished ({unfinished_state(ckpt, cfg)}): its weights at "
                      "that point are used", stacklevel=2)
    built.method.to(pick_device(built.settings.device))
    return built


def unfinished_state(ckpt: dict[str, Any], cfg: dict[str, Any]) -> str:
    """Where an interrupted run stopped, from its checkpoint: ``stopped in epoch 2 of 3, after
    batch 9`` or ``stopped after epoch 2 of 3``."""
    epoch, batch, of = int(ckpt.get("epoch", 0)), int(ckpt.get("batch", 0)), cfg.get("epochs")
    total = f" of {of}" if of else ""
    return f"stopped in epoch {epoch + 1}{total}, after batch {batch}" if batch else \
        f"stopped after epoch {epoch}{total}"


def warn_if_other_data(run: RunFolder, data: Data) -> None:
    """Warn when ``data`` is not what the run's ``data.json`` says it trained on."""
    other = run.data_differences(data.identity or {})
    if other:
        warnings.warn(f"{run} was trained on other data than the {data.name} data at hand "
                      f"({other}); the data at hand is used", stacklevel=3)


def evaluate_built(built: Built) -> dict[str, float]:
    """Top-1/top-5 test error of every classifier of a built run."""
    device = pick_device(built.settings.device)
    built.method.to(device)
    return evaluate(built.method, built.data.test, device,
                    Precision(built.settings.precision, device), built.settings)


__all__ = ["Built", "build", "build_method", "load_run", "warn_if_other_data", "evaluate_built"]
