"""Whole-batch augmentation and normalisation as tensor ops on the training device.

Every random op takes a ``torch.Generator`` on the batch's device, so a batch's augmentation is
reproducible from the generator's seed. No per-sample Python loop: crops are one ``gather``
with per-sample index grids.

A *transform* (what loaders accept) is a callable ``(uint8 batch [B,C,H,W], generator) -> uint8
batch``; :func:`cifar_train`, :func:`imagenet_train` and :func:`imagenet_eval` are the papers'.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
#: the official DCM code's normalisation, used for CIFAR-10 and CIFAR-100 alike
#: (``T.Normalize(np.array([125.3, 123.0, 113.9]) / 255, np.array([63.0, 62.1, 66.7]) / 255)``)
OFFICIAL_CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
OFFICIAL_CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int,
          flip: torch.Tensor | None) -> torch.Tensor:
    """Per-sample ``height``×``width`` windows at (``top``, ``left``), mirrored where ``flip``."""
    b, c, h, w = x.shape
    rows = top[:, None] + torch.arange(height, device=x.device)            # [B, height]
    cols = left[:, None] + torch.arange(width, device=x.device)            # [B, width]
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, height * width)
    out = x.reshape(b, c, h * w).gather(2, index.expand(b, c, height * width))
    return out.view(b, c, height, width)


def _flips(b: int, p: float, generator: torch.Generator | None, device: torch.device
           ) -> torch.Tensor:
    return torch.rand(b, generator=generator, device=device) < p


PAD_MODES = ("zeros", "reflect")


def pad(x: torch.Tensor, padding: int, mode: str = "zeros") -> torch.Tensor:
    """Pad the last two dims by ``padding``: with zeros (the usual CIFAR recipe), or by
    reflection (``reflect``: the official DCM code's ``T.Pad(4, padding_mode='reflect')``).
    Works for any dtype (torch's reflection pad has no uint8 kernel): an index gather."""
    if not padding:
        return x
    if mode == "zeros":
        return F.pad(x, (padding, padding, padding, padding))
    if mode != "reflect":
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    h, w = x.shape[-2:]
    if padding >= min(h, w):
        raise ValueError(f"reflective padding {padding} needs images larger than {padding} px")

    def reflected(n: int) -> torch.Tensor:
        i = torch.arange(-padding, n + padding, device=x.device).abs()
        return torch.where(i >= n, 2 * (n - 1) - i, i)

    return x.index_select(-2, reflected(h)).index_select(-1, reflected(w))


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                     flip: bool = True, pad_mode: str = "zeros") -> torch.Tensor:
    """CIFAR augmentation: pad by ``padding`` (zeros, or ``reflect``), take a random H×W crop
    per sample, mirror each sample horizontally with probability 1/2 (when ``flip``). Keeps
    dtype and shape."""
    b, _, h, w = x.shape
    padded = pad(x, padding, pad_mode)
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    flips = _flips(b, 0.5, generator, x.device) if flip else None
    return _crop(padded, top, left, h, w, flips)


def random_crop(x: torch.Tensor, size: int = 224, generator: torch.Generator | None = None,
                flip: bool = True) -> torch.Tensor:
    """ImageNet training augmentation on resized batches: a random ``size``×``size`` crop per
    sample and a horizontal flip with probability 1/2 (when ``flip``)."""
    b, _, h, w = x.shape
    if size > h or size > w:
        raise ValueError(f"crop {size} larger than the {h}×{w} images")
    top = torch.randint(0, h - size + 1, (b,), generator=generator, device=x.device)
    left = torch.randint(0, w - size + 1, (b,), generator=generator, device=x.device)
    flips = _flips(b, 0.5, generator, x.device) if flip else None
    return _crop(x, top, left, size, size, flips)


def center_crop(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The central ``size``×``size`` window (ImageNet evaluation)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop {size} larger than the {h}×{w} images")
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Float32 ``(x/255 - mean) / std`` per channel for uint8 ``x`` (float ``x``: already 0..1)."""
    c = x.shape[-3]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(c, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(c, 1, 1)
    xf = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return (xf - m) / s


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...],
                                                                    tuple[float, ...]]:
    """Per-channel mean and std (on the 0..1 scale) of a uint8 ``[N,C,H,W]`` tensor."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(images), chunk):
        part = images[i:i + chunk].float().div_(255.0)
        total += part.sum(dim=(0, 2, 3)).double().cpu()
        total_sq += part.square_().sum(dim=(0, 2, 3)).double().cpu()
    n = images.numel() / c
    mean = total / n
    std = (total_sq / n - mean.square()).clamp_min(0).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# ----------------------------------------------------------------------------- ready transforms

def pad_crop_flip(padding: int = 4, flip: bool = True, pad_mode: str = "zeros") -> Transform:
    """A transform: :func:`random_crop_flip` with the given padding."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"data.pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")

    def transform(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return random_crop_flip(x, padding, generator, flip, pad_mode)
    transform.__qualname__ = f"pad_crop_flip(padding={padding}, flip={flip}, pad_mode={pad_mode})"
    return transform


def cifar_train(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """SPEC.md §3 CIFAR training: pad 4, random 32×32 crop, horizontal flip."""
    return random_crop_flip(x, 4, generator)


def imagenet_train(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """SPEC.md §3 ImageNet training on 256×256 batches: random 224 crop + horizontal flip."""
    return random_crop(x, 224, generator)


def imagenet_eval(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """SPEC.md §3 ImageNet evaluation on 256×256 batches: centre 224 crop."""
    return center_crop(x, 224)
