"""Batches from anything: the library's loaders, a torch ``DataLoader``, or any re-iterable of
``(images, labels)`` batches, behind the loaders' one interface: ``len(batches)`` batches per
epoch and ``batches.epoch(e, start_batch=k)``.

For a ``DataLoader`` (or any iterable) the order of epoch ``e`` is made a pure function of
``(seed, e)``: the iterator is created with torch's CPU generator (and the loader's own
``generator``, if it has one) seeded from them, inside a forked RNG so the caller's random state
is untouched, and a ``DistributedSampler`` gets ``set_epoch(e)``. A resumed epoch skips its first
``start_batch`` batches. This reproduces the uninterrupted run exactly when the batches'
randomness comes from the sampler or from worker processes (``num_workers > 0``, seeded per
epoch by the loader); random transforms run in the main process (``num_workers=0``) draw from the
global generator and are not replayed after a mid-epoch resume.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Protocol

import torch

from dcmkd.data.loader import Batch, derive_seed


class Batches(Protocol):
    """What the training loop iterates."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]: ...


class IterableBatches:
    """A ``DataLoader`` or another re-iterable of ``(images, labels)`` as :class:`Batches`."""

    def __init__(self, iterable: Iterable[Any], seed: int = 0, what: str = "data"):
        if iter(iterable) is iterable:
            raise TypeError(f"{what} is an iterator, which can be read only once: give a list, a "
                            "DataLoader or another re-iterable of (images, labels) batches")
        try:
            self._len = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{what} has no len(): the loop needs the number of batches per "
                            "epoch (give a DataLoader over a map-style dataset, or a list)") from None
        if self._len == 0:
            raise ValueError(f"{what} holds no batch")
        self.iterable, self.seed, self.what = iterable, int(seed), what

    def __len__(self) -> int:
        return self._len

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"start_batch {start_batch} outside 0..{self._len}")
        sampler = getattr(self.iterable, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        seed = derive_seed(self.seed, epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = getattr(self.iterable, "generator", None)
            if isinstance(generator, torch.Generator):
                generator.manual_seed(seed)
            it = iter(self.iterable)
            for _ in range(start_batch):
                next(it)
            first = next(it, None)
        if first is None:
            return
        yield self._pair(first)
        for batch in it:
            yield self._pair(batch)

    def _pair(self, batch: Any) -> Batch:
        try:
            images, labels = batch
        except (TypeError, ValueError):
            raise TypeError(f"{self.what}: a batch must be a pair (images, labels), got "
                            f"{type(batch).__name__}") from None
        return images, labels


def as_batches(data: Any, seed: int = 0, what: str = "data") -> Batches:
    """The library's loaders as they are; anything else wrapped in :class:`IterableBatches`."""
    if callable(getattr(data, "epoch", None)) and hasattr(data, "__len__"):
        return data
    return IterableBatches(data, seed, what)


__all__ = ["Batches", "IterableBatches", "as_batches"]
