"""Scales of a reproduction: ``full`` (the paper's protocol), ``quick`` and ``smoke``.

- ``full``: the experiment's configs as written (SPEC.md §3 recipes).
- ``quick``: the experiment's own ``scales.quick`` overrides, else a tenth of the epochs. Whatever
  shortens ``epochs`` shortens the schedule with it (:func:`shorten`): step sizes, milestones and
  warm-up scale by the same factor, so the schedule keeps its shape (this library's choice).
- ``smoke``: two steps on 8 synthetic images at the smallest input size the backbones accept, one
  epoch, one seed, lr 0.01: proves that a row builds and runs end to end, says nothing about
  accuracy.
  ``standins=True`` additionally swaps backbones of more than ~5M parameters for the smallest
  model of their family (:data:`SMOKE_STANDINS`), so the test suite can run every row of every
  table on 2 CPU cores; the full-size backbones and their classifier tables are checked by the
  model and head tests.
  A table of the face or detection task (SSKD Tables 7–9) keeps its data's task: its smoke runs
  train on a tiny synthetic dataset of that task written under the reproduction's folder
  (:func:`smoke_task_overrides`, :mod:`dcmkd.data.synthetic_tasks`): 16 training face crops and
  50 test ones of unseen identities at the smallest input size of the backbones; 4 + 4 COCO
  images of 128 px, detectors resized to 128 px.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch

from dcmkd.models import create_model

SCALES = ("full", "quick", "smoke")

#: large backbone → smallest zoo model of the same family (smoke runs with ``standins=True``)
SMOKE_STANDINS = {
    "wrn28_10": "wrn16_2", "wrn28_4": "wrn16_2", "wrn16_8": "wrn16_2", "wrn22_8": "wrn16_2",
    "wrn40_4": "wrn16_2", "wrn16_4": "wrn16_2", "wrn40_2": "wrn16_2",
    "resnet50": "resnet18", "resnet34": "resnet18",
    "densenet100_12": "densenet40_12", "densenet121_cifar": "densenet40_12",
    # the detectors' torchvision ResNet backbones (SSKD Tables 8–9)
    "resnet101": "resnet18", "resnet152": "resnet18",
}

#: the tasks other than classification with a smoke dataset (:func:`smoke_task_overrides`)
SMOKE_TASKS = ("face", "detection")
#: detection smoke runs: image side of the synthetic COCO images and of the detectors' resize
SMOKE_DETECTION_SIZE = 128

#: the reduced protocol when an experiment does not define its own
DEFAULT_QUICK_FRACTION = 0.1


def shorten(cfg: dict[str, Any], epochs: int) -> dict[str, Any]:
    """``cfg`` with ``epochs`` epochs and its schedule scaled by the same factor.

    Step sizes, absolute milestones (> 1) and warm-up epochs are multiplied by
    ``epochs / cfg["epochs"]`` (rounded, at least 1); fractional milestones (≤ 1) and cosine
    schedules are relative already."""
    out = copy.deepcopy(cfg)
    if epochs == cfg["epochs"]:
        return out
    f = epochs / cfg["epochs"]

    def scaled(x: float) -> int:  # round half up, at least one epoch
        return max(1, math.floor(x * f + 0.5))

    s = out["schedule"]
    s["step_size"] = scaled(s["step_size"])
    s["milestones"] = [m if m <= 1 else scaled(m) for m in s["milestones"]]
    if s.get("warmup_epochs"):
        s["warmup_epochs"] = scaled(s["warmup_epochs"])
    out["epochs"] = epochs
    return out


def quick_overrides(experiment_scales: dict[str, dict], full_epochs: int) -> dict[str, Any]:
    q = copy.deepcopy(experiment_scales.get("quick") or {})
    q.setdefault("epochs", max(1, round(full_epochs * DEFAULT_QUICK_FRACTION)))
    return q


def smoke_image_size(nets: list[str]) -> int:
    """The smallest power-of-two input (≥ 8 px) that every backbone reduces to ≥ 1 pixel."""
    stride = 1
    with torch.device("meta"):
        for n in nets:
            stride = max(stride, create_model(n).stage_info[-1].stride)
    return max(8, stride)


def smoke_overrides(nets: list[str], standins: bool) -> dict[str, Any]:
    nets = [SMOKE_STANDINS.get(n, n) for n in nets] if standins else list(nets)
    out: dict[str, Any] = {
        "epochs": 1, "quiet": True,
        # two steps on batches of 4 random images with BN statistics that have seen two batches:
        # a recipe's lr 0.1 with a heavy loss weight (KD's λ·T² = 240) can overflow there
        "optim": {"lr": 0.01},
        "data": {"name": "synthetic", "root": None, "train_subset": 8, "batch_size": 4,
                 "test_batch_size": 8, "image_size": smoke_image_size(nets)},
    }
    if standins:
        out["nets"] = nets
    return out


def smoke_task_overrides(task: str, nets: list[str], standins: bool,
                         data_root: str) -> dict[str, Any]:
    """The smoke layer of a face or detection run: one epoch of two batches of the synthetic
    dataset at ``data_root`` (written by :func:`write_smoke_data`), lr 0.01, quiet; for faces
    the smallest input size of the zoo backbones, for detectors a 128 px resize."""
    if task not in SMOKE_TASKS:
        raise ValueError(f"no smoke data for the {task} task (one of {', '.join(SMOKE_TASKS)})")
    nets = [SMOKE_STANDINS.get(n, n) for n in nets] if standins else list(nets)
    # no warm-up: a shortened one would last the whole epoch
    out: dict[str, Any] = {"epochs": 1, "quiet": True, "optim": {"lr": 0.01},
                           "schedule": {"warmup_epochs": 0}, "data": {"root": str(data_root)}}
    if task == "face":
        out["data"].update(batch_size=8, test_batch_size=64, image_size=smoke_image_size(nets))
    else:
        out["data"].update(batch_size=2, test_batch_size=4)
        out["task"] = {"min_size": SMOKE_DETECTION_SIZE, "max_size": SMOKE_DETECTION_SIZE,
                       "train_split": "train2017", "test_split": "val2017"}
    if standins:
        out["nets"] = nets
    return out


def write_smoke_data(task: str, root: str) -> None:
    """The synthetic dataset of a smoke run of ``task`` at ``root`` (kept when complete)."""
    from dcmkd.data.synthetic_tasks import write_coco_folder, write_identity_folder

    if task == "face":
        write_identity_folder(root)
    else:
        write_coco_folder(root, size=SMOKE_DETECTION_SIZE)
