"""Which memory layout a run uses: ``channels_last`` or the default (contiguous NCHW).

``channels_last`` (:func:`resolve_channels_last`) is ``True``, ``False`` or ``"auto"``. Under
``auto`` the layout is the one measured faster for the networks' family on the run's device
type (:data:`CHANNELS_LAST_FASTER`), channels_last only when it is faster for every network of
the run; a network outside the zoo (a user's model, ``tv:``/``timm:`` names) keeps the default
layout, since nothing was measured for it.
"""
from __future__ import annotations

import torch

from dcmkd.engine.config import _family
from dcmkd.models.registry import MODELS

# Whether channels_last is the faster layout, per device type and family (the recipe families
# of engine/config.py, see family_of).
CHANNELS_LAST_FASTER: dict[str, dict[str, bool]] = {
    # Measured: benchmarks/results/bench_layout_cpu.json (``python benchmarks/bench_step.py
    # --layouts-per-family --device cpu``: one small network per family, one thread; the test
    # tests/test_layout.py fails when a re-measurement there changes a winner).
    "cpu": {
        "cifar_resnet": True,
        "cifar_wrn": True,
        "cifar_densenet": True,
        "imagenet_mobilenetv2": True,
        "imagenet_resnet": True,
    },
    # NOT measured here (no GPU on the machine that wrote this table): the documented
    # recommendation for convolutions on tensor-core GPUs (see resolve_channels_last); every
    # zoo family is convolutional. Replace with ``--layouts-per-family --device cuda`` figures
    # (bench_layout_cuda.json, which the test then compares) when a GPU run exists.
    "cuda": {
        "cifar_resnet": True,
        "cifar_wrn": True,
        "cifar_densenet": True,
        "imagenet_mobilenetv2": True,
        "imagenet_resnet": True,
    },
}


def family_of(net: str) -> str | None:
    """The family of a zoo network name (``engine.config``'s recipe family: ``cifar_resnet``,
    ``cifar_wrn``, ``cifar_densenet``, ``imagenet_mobilenetv2``, ``imagenet_resnet``), or
    ``None`` for a name outside the zoo (a user's model, ``tv:``/``timm:`` networks).
    The CIFAR VGG-16-BN and MobileNet count as ``cifar_resnet`` there; the benchmark measures
    them as members of that family."""
    if not isinstance(net, str) or net not in MODELS:
        return None
    return _family(net)


def resolve_channels_last(value: bool | str, nets: list[str], device: torch.device) -> bool:
    """Whether to run in channels_last: ``value`` itself when it is ``True``/``False``; for
    ``"auto"``, ``True`` only when every network of ``nets`` is a zoo network whose family is
    faster in channels_last on ``device``'s type (:data:`CHANNELS_LAST_FASTER`).

    - CPU: from this project's measurement (benchmarks/results/bench_layout_cpu.json).
    - CUDA: unmeasured here; channels_last for the convolutional families, following the
      PyTorch tutorial "(beta) Channels Last Memory Format in PyTorch"
      (pytorch.org/tutorials/intermediate/memory_format_tutorial.html: its performance-gains
      section reports faster AMP training of ResNet-50 and other vision models on tensor-core
      GPUs) and NVIDIA's Deep Learning Performance guide, "Convolutional Layers User's Guide",
      section "Tensor Layouts In Memory: NCHW vs NHWC" (tensor-core convolutions run natively
      in NHWC; NCHW inputs are transposed around each convolution). The recommendation is for
      fp16/bf16 (and TF32) tensor cores; the table does not depend on the precision.
    - Any other device type (``meta``, ``mps``, ``xpu``…) and an empty ``nets``: the default.
    """
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ValueError(f"channels_last: expected true, false or 'auto', got {value!r}")
    table = CHANNELS_LAST_FASTER.get(torch.device(device).type)
    if table is None or not nets:
        return False
    return all(table.get(family_of(n), False) for n in nets)
