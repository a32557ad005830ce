"""What a run trains on, as a small JSON record: a run folder's ``data.json``.

``data.root`` does not define a run (the same data may move to another disk or machine), so the
config alone cannot tell two datasets under the same name apart. The identity can: the dataset's
name, its class names, the number of images of each split and a digest of its labels, and, for an
image folder, of every file's path (relative to the dataset's root) and size, as scanned (an
undecodable file that ``data.skip_bad_images`` leaves out still counts). It is taken from the
dataset as stored, before ``train_subset`` and label noise (which the config records). It reads
no pixel: decoders differ between machines, and a folder of the same files must match wherever
it lies. Two copies of CIFAR share one identity (their files are checked against the published
md5 at download).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import torch


def identity(name: str, classes: Sequence[str], train_labels: Any, test_labels: Any,
             files: Iterable[tuple[str, int]] = ()) -> dict[str, Any]:
    """The identity of a dataset: ``files`` are ``(relative path, size in bytes)`` of every
    image of both splits, for datasets read from files one by one."""
    h = hashlib.sha256(json.dumps([name, list(classes)]).encode())
    for labels in (train_labels, test_labels):
        h.update(_int64(labels).tobytes() + b"|")
    for path, size in files:
        h.update(f"{path}\0{size}\n".encode("utf-8", "surrogateescape"))
    return {"dataset": name, "classes": len(classes), "train_images": len(train_labels),
            "test_images": len(test_labels), "digest": h.hexdigest()[:16]}


def folder_files(root: str | os.PathLike, paths: Sequence[str]) -> list[tuple[str, int]]:
    """``(path relative to the dataset's root, size)`` of every image in ``paths``."""
    base = os.fspath(os.path.expanduser(root))
    return [(os.path.relpath(p, base), os.stat(p).st_size) for p in paths]


def folder_identity(name: str, root: str | os.PathLike,
                    train: tuple[Sequence[str], Any, Sequence[str]],
                    test: tuple[Sequence[str], Any, Sequence[str]]) -> dict[str, Any]:
    """The identity of an image folder from the scans of its two splits, each ``(paths,
    labels, class names)`` as :func:`dcmkd.data.folder.scan_folder` returns them."""
    return identity(name, train[2], train[1], test[1],
                    folder_files(root, [*train[0], *test[0]]))


def _int64(labels: Any) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    return np.ascontiguousarray(np.asarray(labels, dtype=np.int64))


def generic_identity(train: Any) -> dict[str, Any]:
    """For training data the library did not load: a loader over a dataset (a ``DataLoader``)
    by its number of samples and batch size (not its batches per epoch, which a
    ``DistributedSampler`` divides by the number of processes), anything else (a list of
    batches) by its batches per epoch."""
    source = getattr(train, "iterable", train)
    try:
        samples = len(source.dataset)
    except (AttributeError, TypeError):
        return {"batches_per_epoch": len(train)}
    out: dict[str, Any] = {"samples": samples}
    if isinstance(getattr(source, "batch_size", None), int):
        out["batch_size"] = source.batch_size
    return out


__all__ = ["identity", "folder_identity", "folder_files", "generic_identity"]
