"""Tasks: what a batch is, what a model returns and how it is evaluated (:mod:`dcmkd.tasks.base`).

========================  =========================================================================
task                      batch / evaluation
========================  =========================================================================
classification            ``(images, labels)`` / top-1 and top-5 error of every classifier
face                      ``(images, identities)`` / open-set verification (TAR@FAR) and
                          identification (Rank-k) of the embeddings on unseen identities
detection                 ``(images, box targets)`` / COCO AP of the detections
========================  =========================================================================
"""
from __future__ import annotations

from typing import Any

from dcmkd.tasks.base import Task
from dcmkd.tasks.classification import Classification

CLASSIFICATION = Classification()


def task_named(name: str | None) -> Task:
    """The task a run's summary names (``task``; none: classification)."""
    if name in (None, "classification"):
        return CLASSIFICATION
    if name == "face":
        from dcmkd.tasks.face import Face

        return Face()
    if name == "detection":
        from dcmkd.tasks.detection import Detection

        return Detection()
    raise ValueError(f"unknown task '{name}' (classification, face, detection)")


def task_of(method: Any) -> Task:
    """The task a method trains on (``method.task``; classification when it names none)."""
    task = getattr(method, "task", None)
    return task if isinstance(task, Task) else CLASSIFICATION


__all__ = ["Task", "Classification", "CLASSIFICATION", "task_of", "task_named"]
