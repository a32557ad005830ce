"""Resumable loaders: order and augmentation are pure functions of (seed, epoch, batch)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from dcmkd.data import DeviceLoader, StreamLoader
from dcmkd.data.augment import cifar_train, normalize

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _data(n: int = 50, size: int = 8):
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    return x, torch.arange(n)  # label = sample index, to track the order


def _train(seed: int = 0, **kw) -> DeviceLoader:
    x, y = _data()
    return DeviceLoader(x, y, 8, train=True, seed=seed, augment=cifar_train, mean=MEAN, std=STD,
                        **kw)


def _collect(it):
    return [(x.clone(), y.clone()) for x, y in it]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
                                    for p, q in zip(a, b))


def test_same_seed_and_epoch_give_the_same_batches():
    a, b = _collect(_train().epoch(3)), _collect(_train().epoch(3))
    assert _same(a, b)
    assert len(a) == len(_train()) == 6 and all(len(y) == 8 for _, y in a)  # 50 // 8, drop_last
    seen = torch.cat([y for _, y in a])
    assert len(set(seen.tolist())) == 48
    assert a[0][0].dtype == torch.float32 and a[0][0].shape == (8, 3, 8, 8)


def test_resume_at_batch_k_matches_the_full_pass():
    loader = _train()
    full = _collect(loader.epoch(4))
    for k in (0, 1, 5, 6):
        assert _same(_collect(loader.epoch(4, start_batch=k)), full[k:])
    with pytest.raises(ValueError):
        list(loader.epoch(4, start_batch=7))


def test_epochs_and_seeds_differ():
    a = _collect(_train().epoch(0))
    assert not torch.equal(a[0][1], _collect(_train().epoch(1))[0][1])
    assert not torch.equal(a[0][1], _collect(_train(seed=1).epoch(0))[0][1])


def test_augmentation_depends_on_batch_not_on_history():
    loader = _train()
    order = loader.indices(2)
    full = _collect(loader.epoch(2))
    x, _ = _data()
    # batch 3 is augmented, and its augmentation is reproducible from (seed, epoch, batch) alone
    idx = order[24:32]
    assert torch.equal(full[3][1], idx)
    expected = normalize(cifar_train(x[idx], loader.batch_generator(2, 3)), MEAN, STD)
    assert torch.equal(full[3][0], expected)
    assert not torch.equal(full[3][0], normalize(x[idx], MEAN, STD))


def test_every_batch_gets_its_own_augmentation():
    x = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(1, 3, 8, 8).repeat(64, 1, 1, 1)
    loader = DeviceLoader(x, torch.arange(64), 16, train=True, seed=0, augment=cifar_train)
    batches = [b for b, _ in loader.epoch(0)]
    assert all(not torch.equal(batches[0], b) for b in batches[1:])
    assert not torch.equal(batches[0], next(loader.epoch(1))[0])


def test_test_loader_in_order_every_sample_once_no_augmentation():
    x, y = _data(50)
    loader = DeviceLoader(x, y, 16, train=False, augment=None, mean=MEAN, std=STD)
    batches = _collect(loader)
    assert len(loader) == 4 and [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.arange(50))
    assert torch.equal(torch.cat([b[0] for b in batches]), normalize(x, MEAN, STD))
    assert _same(batches, _collect(loader.epoch(7)))


def test_data_parallel_shards_are_disjoint():
    """The batch size is the global batch: two ranks' batches of 2 make the single process's
    batch of 4, every sample once per epoch."""
    x, y = _data(50)
    shards = [DeviceLoader(x, y, 4, train=True, seed=2, rank=r, world_size=2) for r in range(2)]
    ids = [torch.cat([b for _, b in s.epoch(1)]) for s in shards]
    assert len(shards[0]) == len(shards[1]) == 12
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    test = [DeviceLoader(x, y, 8, train=False, rank=r, world_size=3) for r in range(3)]
    covered = sorted(torch.cat([b for t in test for _, b in t]).tolist())
    assert covered == list(range(50))


def test_rejects_bad_inputs():
    x, y = _data()
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float(), y, 8, train=True)
    with pytest.raises(ValueError, match="labels"):
        DeviceLoader(x, y[:-1], 8, train=True)


class _Tensors(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_stream_loader_matches_device_loader():
    x, y = _data()
    device = _train()
    stream = StreamLoader(_Tensors(x, y), 8, train=True, seed=0, augment=cifar_train, mean=MEAN,
                          std=STD, num_workers=0)
    assert len(stream) == len(device)
    assert _same(_collect(stream.epoch(5)), _collect(device.epoch(5)))
    assert _same(_collect(stream.epoch(5, start_batch=2)), _collect(device.epoch(5))[2:])
    test = StreamLoader(_Tensors(x, y), 16, train=False, mean=MEAN, std=STD, num_workers=0)
    assert torch.equal(torch.cat([b for _, b in test]), torch.arange(50))
