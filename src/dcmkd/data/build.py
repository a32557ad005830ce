"""From a :class:`DataConfig` to train/test loaders: the one entry point the trainer calls.

Readings (choices the papers leave open), all documented here:

- CIFAR: pad 4 + random 32×32 crop + flip, the dataset's standard mean/std (SPEC.md §3).
- ImageNet: resize to 256×256, random 224 crop + flip / centre 224 crop, ImageNet mean/std.
- Small image folders (≤ ``CACHE_MAX_SIZE`` px): the CIFAR recipe with padding = size/8 and the
  training set's own per-channel mean/std. Large ones: the ImageNet recipe (crop ``image_size``,
  default 224, from images resized to ``image_size``·256/224), ImageNet mean/std.
- digits: pad size/8 + random crop, *no* flip (digits are not mirror-symmetric); own mean/std.
- ``train_subset``: a stratified subset drawn with the fixed seed 0, so every run of a protocol
  (whatever its ``seed``) trains on the same samples; the test set is never subsampled.
- ``val_split`` (beyond the papers, whose tables use the last epoch; default 0, off): that
  fraction of the training images (after ``train_subset``; at least one) is held out as a
  validation split, class-stratified and drawn with the fixed seed :data:`VAL_SEED` (like
  ``train_subset``, the same images for every run of a config, whatever its ``seed``); the
  network is never trained on them, they are evaluated like the test set (no augmentation) and
  ``data.json`` records their number (``val_images``). The test set is never touched.
- Label noise is applied after subsetting and the validation carve, to the training images
  only, with ``noise_seed`` (chosen once, not per run); the validation labels stay the
  dataset's own (**choice**: selection on clean labels, which a noisy-label study should say).
- ``test_batch_size`` (no effect on results): by default :data:`GPU_TEST_BATCH` on a GPU,
  :data:`CPU_TEST_BATCH` on the CPU (see :func:`default_test_batch_size`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from dcmkd.data import augment as aug
from dcmkd.data.cifar import CIFAR, load_cifar
from dcmkd.data.digits import load_digits_dataset
from dcmkd.data.folder import CACHE_MAX_SIZE, FolderStream, first_image, image_size, \
    load_folder_cached, scan_folder
from dcmkd.data.identity import folder_identity, identity
from dcmkd.data.loader import DeviceLoader, StreamLoader
from dcmkd.data.noise import corrupt_labels
from dcmkd.data.subset import stratified_indices
from dcmkd.options import check_fields, option
from dcmkd.registry import UnknownNameError

DATASETS = ("cifar10", "cifar100", "digits", "folder", "imagenet", "synthetic")
#: seed of the ``val_split`` draw (a property of the data, not of the run)
VAL_SEED = 1
#: the largest ``val_split``: a validation split holds at most half of the training images
MAX_VAL_SPLIT = 0.5
#: the datasets loaded whole into memory from the start (the others are image folders)
IN_MEMORY = (*CIFAR, "digits", "synthetic")
NORMALIZATIONS = ("dataset", "official")
#: seed of the ``train_subset`` draw and of the synthetic data (a property of the data, not the run)
SUBSET_SEED = 0

Loader = DeviceLoader | StreamLoader

#: the default evaluation batch on a GPU, and on the CPU, where a large batch overflows the
#: caches: on a 2-core CPU a ResNet-20 (alone, or a DCM pair with its auxiliary classifiers)
#: evaluates 1.6-2.2x as many images per second at 64 as at 512, with 1 or 2 threads
#: (``benchmarks/bench_eval.py``, ``benchmarks/results/bench_eval_cpu*.md``)
GPU_TEST_BATCH, CPU_TEST_BATCH = 512, 64


def default_test_batch_size(device: torch.device | str) -> int:
    """The evaluation batch when ``data.test_batch_size`` is not given."""
    return CPU_TEST_BATCH if torch.device(device).type == "cpu" else GPU_TEST_BATCH


@dataclass
class DataConfig:
    """What to load; the keys of a run config's ``data`` section."""

    name: str = option("digits", "dataset: cifar10, cifar100, digits (bundled), folder, "
                       "imagenet, synthetic; faces (face task), coco or voc (detection "
                       "task)",
                       flag="dataset")
    root: str | None = option(None, "the dataset's folder (null: the bundled or synthetic "
                              "data)", types=(str, None), run=False, flag="data-dir")
    batch_size: int = option(128, "training batch size (the recipes set the papers')", low=1)
    test_batch_size: int | None = option(None, "evaluation batch size (null: by device)",
                                         types=(int, None), low=1, run=False)
    label_noise: float = option(0.0, "fraction of training labels replaced at random", low=0,
                                high=0.95)
    noise_seed: int = option(0, "seed of the label noise")
    train_subset: int | None = option(None, "train on this many images (stratified; null: "
                                      "all)", types=(int, None), low=1)
    val_split: float = option(0.0, "fraction of the training images held out for validation "
                              "(0: none)", low=0, high=MAX_VAL_SPLIT)
    download: bool = option(False, "download a missing dataset (checksums verified)", run=False)
    workers: int = option(4, "loader processes of streamed folders", low=0, run=False)
    image_size: int | None = option(None, "input size (null: the dataset's)", types=(int, None),
                                    low=8)
    cache_dir: str | None = option(None, "where decoded folder images are cached (null: none)",
                                   types=(str, None), run=False)
    skip_bad_images: bool = option(False, "folder datasets: leave out files that cannot be "
                                   "decoded")
    pad_mode: str = option("zeros", "crop padding: zeros (the usual) or reflect (the official "
                           "DCM code)", choices=aug.PAD_MODES)
    normalize: str = option("dataset", "CIFAR: the dataset's statistics, or official (the DCM "
                            "code's CIFAR-10 statistics for both CIFARs); the others use "
                            "ImageNet's, computed or fixed statistics", choices=NORMALIZATIONS)

    def __post_init__(self) -> None:
        check_fields(self, "data.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataConfig":
        """Build from a dict; an unknown key raises :class:`UnknownNameError`."""
        names = cls.__dataclass_fields__
        for k in d:
            if k not in names:
                raise UnknownNameError("data option", k, names)
        return cls(**d)


@dataclass
class Data:
    """Loaders and facts about a dataset. ``noisy_indices``: training samples whose label was
    corrupted (indices into the training set as loaded), ``None`` without label noise.
    ``identity``: what the data is (:mod:`dcmkd.data.identity`), a run folder's ``data.json``."""

    train: Loader
    test: Loader
    num_classes: int
    classes: list[str]
    input_size: int
    noisy_indices: torch.Tensor | None = None
    mean: tuple[float, ...] = field(default=(0.5, 0.5, 0.5))
    std: tuple[float, ...] = field(default=(0.25, 0.25, 0.25))
    name: str = ""
    identity: dict[str, Any] | None = None
    val: Loader | None = None   # the validation split carved from the training set (val_split)


def default_data_root() -> Path:
    """``$DCMKD_DATA``, else ``./data``: where datasets live when ``root`` is not given."""
    return Path(os.environ.get("DCMKD_DATA") or "data")


def _root(cfg: DataConfig, required: bool = False) -> Path:
    if cfg.root:
        return Path(cfg.root).expanduser()
    if required:
        raise ValueError(f"dataset '{cfg.name}' needs data.root: the folder holding train/ and "
                         "test/ (or val/) with one sub-folder of images per class")
    return default_data_root()


def _prepare_train(labels: torch.Tensor, cfg: DataConfig, num_classes: int, subset: bool = True
                   ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                              torch.Tensor | None]:
    """``(indices of the training images or None for all, their labels, noisy indices or
    None, indices of the validation images or None)``; indices are into ``labels``."""
    keep = None
    if subset and cfg.train_subset is not None and cfg.train_subset > len(labels):
        raise ValueError(f"data.train_subset: {cfg.train_subset} is more than the {len(labels)} "
                         f"training images of {cfg.name}")
    if subset and cfg.train_subset is not None and cfg.train_subset < len(labels):
        keep = stratified_indices(labels, cfg.train_subset, SUBSET_SEED)
        labels = labels[keep]
    val = None
    if cfg.val_split > 0:
        keep, val, labels = _carve_validation(labels, keep, cfg)
    noisy = None
    if cfg.label_noise > 0:
        labels, noisy = corrupt_labels(labels, cfg.label_noise, num_classes, cfg.noise_seed)
    return keep, labels, noisy, val


def _carve_validation(labels: torch.Tensor, keep: torch.Tensor | None, cfg: DataConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(training indices, validation indices, training labels)``: ``round(val_split · n)``
    (at least 1) of the ``n`` images at ``keep`` (None: all), class-stratified, drawn with
    :data:`VAL_SEED`."""
    n = len(labels)
    count = max(1, round(cfg.val_split * n))
    if count >= n:
        raise ValueError(f"data.val_split={cfg.val_split:g} of {n} training image(s) leaves none "
                         "to train on: use more data or a smaller data.val_split")
    held = stratified_indices(labels, count, VAL_SEED)
    rest = torch.ones(n, dtype=torch.bool)
    rest[held] = False
    base = keep if keep is not None else torch.arange(n)
    return base[rest], base[held], labels[rest]


def _in_memory(cfg: DataConfig, device, seed: int, train: tuple[torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor], classes: list[str],
               transform: aug.Transform, mean: Sequence[float], std: Sequence[float],
               ident: dict[str, Any], subset: bool = True, **dist: int) -> Data:
    x, y = train
    keep, y_train, noisy, held = _prepare_train(y, cfg, len(classes), subset)
    val = None
    if held is not None:   # the validation images, with the dataset's own labels
        val = DeviceLoader(x[held], y[held], cfg.test_batch_size, train=False, device=device,
                           seed=seed, mean=mean, std=std, **dist)
        ident = {**ident, "val_images": int(len(held))}
    y = y_train
    if keep is not None:
        x = x[keep]
        # what the run trains on beside the dataset as stored (train_images); informational:
        # the run's config records train_subset, and data.json comparisons leave it aside
        ident = {**ident, "train_images_used": int(len(y))}
    return Data(
        train=DeviceLoader(x, y, cfg.batch_size, train=True, device=device, seed=seed,
                           augment=transform, mean=mean, std=std, **dist),
        test=DeviceLoader(test[0], test[1], cfg.test_batch_size, train=False, device=device,
                          seed=seed, mean=mean, std=std, **dist),
        num_classes=len(classes), classes=list(classes), input_size=int(x.shape[-2]),
        noisy_indices=noisy, mean=tuple(mean), std=tuple(std), name=cfg.name, identity=ident,
        val=val)


def _streaming(cfg: DataConfig, device, seed: int, root: Path, crop: int,
               mean: Sequence[float], std: Sequence[float], **dist: int) -> Data:
    resize = round(crop * 256 / 224)
    train_ds = FolderStream(root, "train", size=resize, skip_bad=cfg.skip_bad_images)
    test_ds = FolderStream(root, "val", size=resize, skip_bad=cfg.skip_bad_images)
    ident = folder_identity(cfg.name, root, (train_ds.paths, train_ds.labels, train_ds.classes),
                            (test_ds.paths, test_ds.labels, test_ds.classes))
    keep, labels, noisy, held = _prepare_train(train_ds.labels, cfg, len(train_ds.classes))
    val_ds = None
    if held is not None:
        val_ds = train_ds.select(held)
        ident = {**ident, "val_images": int(len(held)), "train_images_used": int(len(labels))}
    if keep is not None:
        train_ds = train_ds.select(keep)
    train_ds.labels = labels

    def train_tf(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return aug.random_crop(x, crop, g)

    def eval_tf(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        return aug.center_crop(x, crop)

    common = dict(device=device, seed=seed, mean=mean, std=std, num_workers=cfg.workers, **dist)
    return Data(
        train=StreamLoader(train_ds, cfg.batch_size, train=True, augment=train_tf, **common),
        test=StreamLoader(test_ds, cfg.test_batch_size, train=False, augment=eval_tf, **common),
        num_classes=len(train_ds.classes), classes=list(train_ds.classes), input_size=crop,
        noisy_indices=noisy, mean=tuple(mean), std=tuple(std), name=cfg.name, identity=ident,
        val=None if val_ds is None else StreamLoader(val_ds, cfg.test_batch_size, train=False,
                                                     augment=eval_tf, **common))


def synthetic_split(n: int, size: int, num_classes: int, seed: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images ``[n,3,size,size]`` with random labels (tests and benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    return x, torch.randint(0, num_classes, (n,), generator=g)


Split = tuple[torch.Tensor, torch.Tensor]


def _load_bundled_or_cifar(cfg: DataConfig) -> tuple[Split, Split, list[str]]:
    """``(train, test, class names)`` of the datasets held whole in memory from the start."""
    if cfg.name in CIFAR:
        root = _root(cfg)
        train = load_cifar(cfg.name, root, train=True, download=cfg.download)
        test = load_cifar(cfg.name, root, train=False, download=cfg.download)
        return train[:2], test[:2], train[2]
    if cfg.name == "digits":
        size = cfg.image_size or 16
        train, test = load_digits_dataset(True, size), load_digits_dataset(False, size)
        return train[:2], test[:2], train[2]
    size, n = cfg.image_size or 32, cfg.train_subset or 512     # synthetic
    return (synthetic_split(n, size, 10, SUBSET_SEED),
            synthetic_split(min(128, n), size, 10, SUBSET_SEED + 1),   # no more than train
            [str(i) for i in range(10)])


def _streamed(cfg: DataConfig, root: Path) -> bool:
    """Whether a folder dataset streams from disk (ImageNet, large images) or is cached."""
    return cfg.name == "imagenet" or max(image_size(first_image(root, "train"))) > CACHE_MAX_SIZE


def build_data(cfg: DataConfig | dict[str, Any], device: torch.device | str = "cpu",
               seed: int = 0, *, rank: int = 0, world_size: int = 1) -> Data:
    """Load the dataset of ``cfg`` and wrap it in loaders on ``device``.

    ``seed`` (the run's) drives the shuffling and augmentation of the training loader;
    ``rank``/``world_size`` shard both loaders for data-parallel training.
    """
    cfg = _checked(cfg)
    if cfg.test_batch_size is None:
        cfg = replace(cfg, test_batch_size=default_test_batch_size(device))
    dist = {"rank": rank, "world_size": world_size}

    if cfg.name in IN_MEMORY:
        train, test, classes = _load_bundled_or_cifar(cfg)
        ident = identity(cfg.name, classes, train[1], test[1])
        if cfg.name == "synthetic":
            # uniform 0..255 pixels: mean 0.5, std 1/sqrt(12) on the 0..1 scale
            size = cfg.image_size or 32
            return _in_memory(cfg, device, seed, train, test, classes,
                              aug.pad_crop_flip(max(1, size // 8), pad_mode=cfg.pad_mode),
                              (0.5,) * 3, (0.289,) * 3, ident, subset=False, **dist)
        if cfg.name == "digits":
            size = cfg.image_size or 16
            return _in_memory(cfg, device, seed, train, test, classes,
                              aug.pad_crop_flip(max(1, size // 8), flip=False,
                                                pad_mode=cfg.pad_mode),
                              *aug.channel_stats(train[0]), ident, **dist)
        mean, std = ((aug.CIFAR10_MEAN, aug.CIFAR10_STD) if cfg.name == "cifar10"
                     else (aug.CIFAR100_MEAN, aug.CIFAR100_STD))
        if cfg.normalize == "official":
            mean, std = aug.OFFICIAL_CIFAR_MEAN, aug.OFFICIAL_CIFAR_STD
        return _in_memory(cfg, device, seed, train, test, classes,
                          aug.pad_crop_flip(4, pad_mode=cfg.pad_mode), mean, std, ident, **dist)

    root = _root(cfg, required=True)
    if _streamed(cfg, root):   # ImageNet, or a folder of large images
        return _streaming(cfg, device, seed, root, cfg.image_size or 224, aug.IMAGENET_MEAN,
                          aug.IMAGENET_STD, **dist)
    workers = max(1, min(2, cfg.workers))
    scans = {split: scan_folder(root, split) for split in ("train", "test")}
    train, test = (load_folder_cached(root, split, cfg.cache_dir, workers=workers,
                                      skip_bad=cfg.skip_bad_images, scan=scans[split])
                   for split in ("train", "test"))
    if train[2] != test[2]:
        raise ValueError(f"class folders differ between train and test under {root}")
    if train[0].shape[1:] != test[0].shape[1:]:
        raise ValueError(f"train images are {tuple(train[0].shape[2:])} but test images "
                         f"{tuple(test[0].shape[2:])} under {root}")
    mean, std = aug.channel_stats(train[0])
    size = min(train[0].shape[-2:])
    return _in_memory(cfg, device, seed, train[:2], test[:2], train[2],
                      aug.pad_crop_flip(max(1, size // 8), pad_mode=cfg.pad_mode), mean, std,
                      folder_identity(cfg.name, root, scans["train"], scans["test"]), **dist)


def _checked(cfg: DataConfig | dict[str, Any]) -> DataConfig:
    if isinstance(cfg, dict):
        cfg = DataConfig.from_dict(cfg)
    if cfg.name not in DATASETS:
        raise UnknownNameError("dataset", cfg.name, DATASETS)
    return cfg


def dataset_identity(cfg: DataConfig | dict[str, Any]) -> dict[str, Any]:
    """The identity (:mod:`dcmkd.data.identity`) of the data ``cfg`` names, as
    :func:`build_data` records it, without building loaders: an image folder is scanned (file
    names and sizes), not decoded. To compare with a finished run's ``data.json``."""
    cfg = _checked(cfg)
    if cfg.name in IN_MEMORY:
        train, test, classes = _load_bundled_or_cifar(cfg)
        return identity(cfg.name, classes, train[1], test[1])
    root = _root(cfg, required=True)
    evaluation = "val" if _streamed(cfg, root) else "test"
    return folder_identity(cfg.name, root, scan_folder(root, "train"),
                           scan_folder(root, evaluation))


def identity_key(data: dict[str, Any]) -> str:
    """What :func:`dataset_identity` depends on, of a config's ``data`` section: runs whose keys
    agree share one identity (their batch size or label noise may differ)."""
    keys = ("name", "root", "download") + (("train_subset", "image_size")
                                           if data.get("name") == "synthetic" else ())
    return json.dumps({k: data.get(k) for k in keys}, sort_keys=True, default=str)
