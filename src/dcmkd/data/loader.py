"""Resumable, reproducible batch loaders.

Both loaders have one API: ``len(loader)`` batches per epoch and ``loader.epoch(e, start_batch=k)``
yielding ``(normalised float32 images, int64 labels)`` on the device. The sample order of epoch
``e`` is a pure function of ``(seed, e)`` and the augmentation of batch ``b`` a pure function of
``(seed, e, b)`` (for a given device type), so a run resumed at batch ``k`` of epoch ``e`` sees
exactly the batches an uninterrupted run would have seen.

- :class:`DeviceLoader`: the whole uint8 dataset lives on the device (small datasets); a batch
  is an ``index_select`` plus whole-batch augmentation, no workers, no per-sample Python.
- :class:`StreamLoader`: a DataLoader with workers decodes uint8 batches (ImageNet); augmentation
  and normalisation then run on the device the same way.

With ``world_size > 1`` (data-parallel training) ``batch_size`` is the **global** batch: every
rank walks the same global batches and takes every ``world_size``-th sample of each, so a
rank's batch holds ``batch_size / world_size`` samples and the ranks' batches together are the
single-process batch. :class:`DeviceLoader` augments the whole global batch with a generator
that does not depend on the rank before taking its rows, so its batches are exactly those of a
single process whatever the number of ranks (a run resumes exactly at another world size);
:class:`StreamLoader` decodes only its rows and augments them with a per-rank generator.
Evaluation loaders split the samples (``rank::world_size``), their counts summed afterwards.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dcmkd.data.augment import Transform, normalize

Batch = tuple[torch.Tensor, torch.Tensor]  # (normalised float images, int64 labels)


def derive_seed(*values: int) -> int:
    """A 63-bit seed that is a pure, collision-resistant function of the integers ``values``."""
    data = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class _EpochSchedule:
    """The order of samples per epoch and the per-batch augmentation generator."""

    def __init__(self, num_samples: int, batch_size: int, *, train: bool, device, seed: int,
                 augment: Transform | None, mean: Sequence[float], std: Sequence[float],
                 drop_last: bool | None, rank: int, world_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        self.dataset_size, self.batch_size = num_samples, batch_size
        self.train, self.seed, self.augment = train, int(seed), augment
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        if train and batch_size % world_size:
            raise ValueError(f"the global batch of {batch_size} does not split over "
                             f"{world_size} processes: use a multiple of {world_size}")
        if train and world_size > 1 and not self.drop_last and num_samples % batch_size:
            raise ValueError(f"drop_last=False over {world_size} processes: the last partial "
                             "batch would split unevenly (some ranks empty); keep drop_last")
        # training walks the global order; evaluation splits the samples over the ranks
        self.num_samples = num_samples if train else len(range(rank, num_samples, world_size))
        if self.num_samples == 0:
            raise ValueError(f"no samples for rank {rank} of {world_size} ({num_samples} in all)")

    @property
    def rank_batch_size(self) -> int:
        """The samples of one batch on this rank (training: the global batch / world size)."""
        return self.batch_size // self.world_size if self.train else self.batch_size

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def indices(self, epoch: int) -> torch.Tensor:
        """The order of ``epoch`` (CPU int64): training, the global shuffled order (the same on
        every rank); evaluation, this rank's share in stored order."""
        if self.train:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            return torch.randperm(self.dataset_size, generator=g)
        return torch.arange(self.dataset_size)[self.rank::self.world_size]

    def batch_generator(self, epoch: int, batch: int, rank: int = 0) -> torch.Generator:
        """The generator that drives the augmentation of one batch, on the loader's device
        (``rank``: for loaders that augment only their own rows)."""
        g = torch.Generator(device=self.device)
        return g.manual_seed(derive_seed(self.seed, epoch, batch, rank, 1))

    def rows(self) -> slice:
        """This rank's rows of a global training batch."""
        return slice(self.rank, None, self.world_size)

    def _batches(self, epoch: int, start_batch: int, device: torch.device | None = None
                 ) -> Iterator[tuple[int, torch.Tensor]]:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        order = self.indices(epoch)
        if device is not None:
            order = order.to(device)  # one copy per epoch, not one per batch
        for b in range(start_batch, len(self)):
            yield b, order[b * self.batch_size:(b + 1) * self.batch_size]

    def _finish(self, x: torch.Tensor, epoch: int, batch: int, rank: int = 0) -> torch.Tensor:
        if self.augment is not None:
            x = self.augment(x, self.batch_generator(epoch, batch, rank))
        return normalize(x, self.mean, self.std)


class DeviceLoader(_EpochSchedule):
    """Batches from a uint8 ``[N,C,H,W]`` dataset held on ``device`` (moved there once).

    ``augment`` is a transform ``(uint8 batch, generator) -> uint8 batch`` (see
    :mod:`dcmkd.data.augment`); ``mean``/``std`` normalise per channel on the 0..1 scale.
    Training shuffles every epoch and drops the last partial batch (``drop_last`` default =
    ``train``); evaluation keeps the stored order and every sample.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 train: bool, device: torch.device | str = "cpu", seed: int = 0,
                 augment: Transform | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25), drop_last: bool | None = None,
                 rank: int = 0, world_size: int = 1):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        super().__init__(len(images), batch_size, train=train, device=device, seed=seed,
                         augment=augment, mean=mean, std=std, drop_last=drop_last, rank=rank,
                         world_size=world_size)
        self.images = images.to(self.device).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(self.device)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch, …, len(self)-1`` of ``epoch`` (a training rank's rows of
        each global batch, augmented as part of it)."""
        for b, idx in self._batches(epoch, start_batch, self.device):
            x = self._finish(self.images.index_select(0, idx), epoch, b)
            y = self.labels.index_select(0, idx)
            if self.train and self.world_size > 1:
                x, y = x[self.rows()], y[self.rows()]
            yield x, y

    def __iter__(self) -> Iterator[Batch]:
        """One pass in epoch 0's order (what evaluation loops use)."""
        return self.epoch(0)


class _BatchList(Sampler):
    """A batch sampler whose batches are set by the loader before each pass (main process)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class StreamLoader(_EpochSchedule):
    """Batches from a map-style ``dataset`` of ``(uint8 [C,H,W], label)`` decoded by DataLoader
    workers (e.g. :class:`dcmkd.data.folder.FolderStream`), then augmented and normalised on
    ``device`` like :class:`DeviceLoader`. Workers persist across epochs."""

    def __init__(self, dataset: Dataset, batch_size: int, *, train: bool,
                 device: torch.device | str = "cpu", seed: int = 0,
                 augment: Transform | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25), drop_last: bool | None = None,
                 num_workers: int = 4, pin_memory: bool | None = None, prefetch_factor: int = 4,
                 rank: int = 0, world_size: int = 1):
        super().__init__(len(dataset), batch_size, train=train, device=device, seed=seed,
                         augment=augment, mean=mean, std=std, drop_last=drop_last, rank=rank,
                         world_size=world_size)
        self.dataset = dataset
        self._sampler = _BatchList()
        pin = self.device.type == "cuda" if pin_memory is None else pin_memory
        extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} \
            if num_workers > 0 else {}
        self._loader = DataLoader(dataset, batch_sampler=self._sampler, num_workers=num_workers,
                                  pin_memory=pin, **extra)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch, …, len(self)-1`` of ``epoch``."""
        plan = list(self._batches(epoch, start_batch))
        if self.train and self.world_size > 1:   # decode only this rank's rows
            plan = [(b, idx[self.rows()]) for b, idx in plan]
        self._sampler.batches = [idx.tolist() for _, idx in plan]
        for (b, _), (x, y) in zip(plan, self._loader):
            x = x.to(self.device, non_blocking=True)
            y = torch.as_tensor(y, dtype=torch.int64).to(self.device, non_blocking=True)
            yield self._finish(x, epoch, b, self.rank), y

    def __iter__(self) -> Iterator[Batch]:
        """One pass in epoch 0's order (what evaluation loops use)."""
        return self.epoch(0)
