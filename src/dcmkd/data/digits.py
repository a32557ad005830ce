"""The built-in demo dataset: scikit-learn's bundled handwritten digits (no download).

1,797 grey 8×8 images with values 0..16, 10 classes. They are scaled to 0..255, upsampled
(bilinear) to ``size``×``size``, repeated over three channels, and split once, stratified by
class with seed 0, into 360 test and 1,437 training images.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from dcmkd.data.subset import stratified_indices

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
DIGITS_CLASSES = [str(i) for i in range(10)]


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the 'digits' demo dataset needs scikit-learn: "
                          "pip install 'dcmkd[train]'") from e
    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=4)
def _digits_split(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = _raw_digits()
    x = torch.from_numpy(images).unsqueeze(1) * (255.0 / 16.0)          # [N,1,8,8], 0..255
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    mask = torch.zeros(len(labels), dtype=torch.bool)
    mask[stratified_indices(labels, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)] = True
    return x, torch.from_numpy(labels), mask


def load_digits_dataset(train: bool, size: int = 16
                        ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A digits split: ``(uint8 [N,3,size,size], int64 labels [N], ['0', …, '9'])``.

    ``train`` gives the 1,437 training images, otherwise the 360 test images, in the original
    order of scikit-learn's file.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    x, y, test = _digits_split(int(size))
    keep = ~test if train else test
    return x[keep].clone(), y[keep].clone(), list(DIGITS_CLASSES)
