"""The bundled digits demo set and the build entry point on it and on synthetic data."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dcmkd.data import DataConfig, build_data, load_digits_dataset
from dcmkd.data import digits as digits_mod
from dcmkd.data.subset import stratified_indices
from dcmkd.registry import UnknownNameError


def test_shapes_split_and_classes():
    x, y, classes = load_digits_dataset(train=True)
    xt, yt, _ = load_digits_dataset(train=False)
    assert x.shape == (1437, 3, 16, 16) and xt.shape == (360, 3, 16, 16)
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    assert classes == [str(i) for i in range(10)]
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey as RGB
    assert x.min() == 0 and x.max() == 255


def test_split_is_stratified_deterministic_and_disjoint():
    from sklearn.datasets import load_digits

    target = load_digits().target
    _, yt, _ = load_digits_dataset(train=False)
    expected = np.bincount(target) * 360 / len(target)
    assert (np.abs(np.bincount(yt.numpy()) - expected) < 1).all()
    digits_mod._digits_split.cache_clear()
    digits_mod._raw_digits.cache_clear()
    again = load_digits_dataset(train=False)
    assert torch.equal(again[0], load_digits_dataset(train=False, size=16)[0])
    x8, y8, _ = load_digits_dataset(train=True, size=8)
    xt8, yt8, _ = load_digits_dataset(train=False, size=8)
    raw = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    # train + test = the whole file: every raw image is used exactly once
    both = torch.cat([x8[:, 0], xt8[:, 0]]).numpy()
    key = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert key(both) == key(raw)


def test_stratified_indices():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_indices(labels, 10, seed=3)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert torch.equal(idx, stratified_indices(labels, 10, seed=3))
    assert not torch.equal(idx, stratified_indices(labels, 10, seed=4))
    assert len(stratified_indices(labels, 7, seed=0)) == 7


def test_missing_sklearn_message(monkeypatch):
    digits_mod._raw_digits.cache_clear()
    digits_mod._digits_split.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'dcmkd\[train\]'"):
        load_digits_dataset(train=True)
    digits_mod._raw_digits.cache_clear()
    digits_mod._digits_split.cache_clear()


def test_build_digits():
    data = build_data(DataConfig(name="digits", batch_size=64, image_size=16), "cpu", seed=0)
    assert data.num_classes == 10 and data.input_size == 16 and data.noisy_indices is None
    assert len(data.train) == 1437 // 64 and len(data.test) == 6   # 360 test images by 64
    x, y = next(data.train.epoch(0))
    assert x.shape == (64, 3, 16, 16) and abs(x.mean().item()) < 0.5


def test_build_synthetic_with_noise():
    data = build_data({"name": "synthetic", "train_subset": 100, "image_size": 12,
                       "label_noise": 0.2, "batch_size": 10}, "cpu", seed=0)
    assert data.input_size == 12 and len(data.train.labels) == 100 and len(data.train) == 10
    assert len(data.noisy_indices) == 20 and len(data.test.labels) == 100  # min(128, train)
    clean = build_data({"name": "synthetic", "train_subset": 100, "image_size": 12}, "cpu")
    changed = (clean.train.labels != data.train.labels).nonzero().flatten()
    assert torch.equal(changed, data.noisy_indices)


def test_test_batch_size_defaults_to_the_device_and_a_given_value_wins():
    from dcmkd.data.build import default_test_batch_size

    data = build_data({"name": "synthetic", "train_subset": 200}, "cpu")
    assert len(data.test) == 2 and len(next(data.test.epoch(0))[1]) == 64   # 128 test images
    assert default_test_batch_size("cuda:1") == 512 and default_test_batch_size("cpu") == 64
    given = build_data({"name": "synthetic", "train_subset": 200, "test_batch_size": 100}, "cpu")
    assert len(given.test) == 2 and len(next(given.test.epoch(0))[1]) == 100


def test_unknown_dataset_and_option():
    with pytest.raises(UnknownNameError, match="cifar10"):
        build_data({"name": "cifar11"})
    with pytest.raises(UnknownNameError, match="batch_size"):
        DataConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="data.root"):
        build_data({"name": "imagenet"})
