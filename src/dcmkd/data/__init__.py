"""Datasets, on-device batch augmentation, label noise and resumable loaders.

Entry point: :func:`build_data` (a :class:`DataConfig` → a :class:`Data` with ``train`` and
``test`` loaders). This package imports nothing of dcmkd except :mod:`dcmkd.registry`.
"""
from __future__ import annotations

from dcmkd.data.augment import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                IMAGENET_MEAN, IMAGENET_STD, center_crop, normalize,
                                random_crop, random_crop_flip)
from dcmkd.data.build import DATASETS, Data, DataConfig, build_data, dataset_identity
from dcmkd.data.cifar import download_cifar, load_cifar
from dcmkd.data.digits import load_digits_dataset
from dcmkd.data.folder import FolderStream, load_folder_cached, scan_folder
from dcmkd.data.loader import DeviceLoader, StreamLoader
from dcmkd.data.noise import corrupt_labels

__all__ = [
    "DATASETS", "Data", "DataConfig", "build_data", "dataset_identity",
    "load_cifar", "download_cifar", "load_digits_dataset",
    "scan_folder", "load_folder_cached", "FolderStream",
    "DeviceLoader", "StreamLoader", "corrupt_labels",
    "random_crop_flip", "random_crop", "center_crop", "normalize",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD",
]
