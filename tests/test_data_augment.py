"""Whole-batch augmentation: crops are windows of the padded input, flips ~1/2, reproducible."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dcmkd.data.augment import (CIFAR10_MEAN, CIFAR10_STD, center_crop, channel_stats,
                                imagenet_eval, imagenet_train, normalize, random_crop,
                                random_crop_flip)


def _windows(padded: torch.Tensor, h: int, w: int):
    """Every (top, left, flipped) window of one padded [C,Hp,Wp] image."""
    for top in range(padded.shape[1] - h + 1):
        for left in range(padded.shape[2] - w + 1):
            win = padded[:, top:top + h, left:left + w]
            yield (top, left, False), win
            yield (top, left, True), win.flip(-1)


def _match(out: torch.Tensor, padded: torch.Tensor):
    matches = [key for key, win in _windows(padded, *out.shape[-2:]) if torch.equal(win, out)]
    assert len(matches) == 1, "output is not exactly one window of the padded input"
    return matches[0]


def test_crop_is_a_window_of_the_zero_padded_input():
    b, c, h, w = 64, 3, 6, 5
    x = torch.arange(1, b * c * h * w + 1, dtype=torch.int64).view(b, c, h, w)  # unique, nonzero
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = F.pad(x, (2, 2, 2, 2))
    keys = [_match(out[i], padded[i]) for i in range(b)]
    assert len({k[:2] for k in keys}) > 10           # offsets vary per sample
    assert {k[2] for k in keys} == {False, True}     # both flip states occur


def test_uint8_batch_keeps_dtype_and_zero_border():
    x = torch.full((200, 3, 8, 8), 255, dtype=torch.uint8)
    out = random_crop_flip(x, padding=4, generator=torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8
    zero_rows = (out == 0).all(dim=(1, 3)).sum(dim=1)           # fully padded rows per sample
    assert zero_rows.max() == 4 and zero_rows.min() == 0


def test_flip_probability_is_one_half():
    n = 4000
    x = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).repeat(n, 1, 1, 1)
    out = random_crop_flip(x, padding=0, generator=torch.Generator().manual_seed(2))
    flipped = (out[:, 0, 0, 0] == 3).float()
    assert ((out[:, 0, 0, 0] == 0) | (out[:, 0, 0, 0] == 3)).all()
    assert abs(flipped.mean().item() - 0.5) < 0.04
    assert torch.equal(random_crop_flip(x, 0, torch.Generator().manual_seed(2), flip=False), x)


def test_offsets_are_uniform_over_all_shifts():
    n = 9000
    x = torch.zeros(n, 1, 1, 1)
    x[..., 0, 0] = 1
    out = random_crop_flip(x, padding=1, generator=torch.Generator().manual_seed(3), flip=False)
    # a 1x1 image padded by 1: the crop hits the pixel with probability 1/9
    assert abs(out.mean().item() - 1 / 9) < 0.015


def test_same_seed_same_output_different_seed_different():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    a = random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_and_center_crop():
    b = 40
    x = torch.arange(1, b * 2 * 9 * 9 + 1).view(b, 2, 9, 9)
    out = random_crop(x, 5, torch.Generator().manual_seed(0))
    assert out.shape == (b, 2, 5, 5)
    keys = [_match(out[i], x[i]) for i in range(b)]
    assert max(k[0] for k in keys) <= 4 and len({k[:2] for k in keys}) > 5
    assert torch.equal(center_crop(x, 5), x[..., 2:7, 2:7])
    big = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    assert imagenet_train(big, torch.Generator().manual_seed(0)).shape == (2, 3, 224, 224)
    assert imagenet_eval(big).shape == (2, 3, 224, 224)


def test_normalize_and_channel_stats():
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    y = normalize(x, CIFAR10_MEAN, CIFAR10_STD)
    ref = (x.double() / 255 - torch.tensor(CIFAR10_MEAN).view(3, 1, 1).double()) \
        / torch.tensor(CIFAR10_STD).view(3, 1, 1).double()
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, atol=1e-5)
    mean, std = channel_stats(x, chunk=3)
    xf = x.double() / 255
    assert torch.allclose(torch.tensor(mean, dtype=torch.float64), xf.mean(dim=(0, 2, 3)),
                          atol=1e-6)
    assert torch.allclose(torch.tensor(std, dtype=torch.float64),
                          xf.transpose(0, 1).reshape(3, -1).std(dim=1, unbiased=False), atol=1e-6)
