"""Which memory layout a run uses: ``channels_last`` or the default (contiguous NCHW).

``channels_last`` (:func:`resolve_channels_last`) is ``True``, ``False`` or ``"auto"``. Under
``auto`` the layout is the one measured faster for the networks' family on the run's device
type (:data:`CHANNELS_LAST_FASTER`; a measured network that differs from its family:
:data:`NETWORK_EXCEPTIONS`), channels_last only when it is faster for every network of the
run; a network outside the zoo (a user's model, ``tv:``/``timm:`` names) keeps the default
layout, since nothing was measured for it.
"""
from __future__ import annotations

import torch

from dcmkd.engine.config import _family
from dcmkd.models.registry import MODELS

# Whether channels_last is the layout to use, per device type and family (the recipe families
# of engine/config.py, see family_of), and per network where a measured network of a family
# disagrees with the family's representative (NETWORK_EXCEPTIONS).
CHANNELS_LAST_FASTER: dict[str, dict[str, bool]] = {
    # Measured: benchmarks/results/bench_layout_cpu.json (``python benchmarks/bench_step.py
    # --layouts-per-family --device cpu --methods ind,dcm``: one small network per family, one
    # thread, batch 16, 32 px CIFAR / 64 px ImageNet inputs; ties within ±3 % count as
    # channels_last). tests/test_layout.py fails when a re-measurement changes a winner.
    "cpu": {
        "cifar_resnet": True,           # resnet20: ind 1.17x, dcm 1.06x
        "cifar_wrn": True,              # wrn16_2: 1.12x, 1.12x
        "cifar_densenet": True,         # densenet40_12: 1.35x, 1.29x
        "imagenet_mobilenetv2": True,   # mobilenetv2: 1.50x, 1.46x
        "imagenet_resnet": False,       # resnet18: ind 1.05x but dcm 0.85x
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
NETWORK_EXCEPTIONS: dict[str, dict[str, bool]] = {
    # benchmarks/results/bench_layout_cpu.json: counted as cifar_resnet, but its DCM step is
    # 0.75x in channels_last (ind 1.00x)
    "cpu": {"vgg16_bn": False},
    "cuda": {},
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
    faster in channels_last on ``device``'s type (:data:`CHANNELS_LAST_FASTER`), unless the
    network itself was measured otherwise (:data:`NETWORK_EXCEPTIONS`).

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
    kind = torch.device(device).type
    if kind not in CHANNELS_LAST_FASTER or not nets:
        return False
    return all(_faster_in_channels_last(n, kind) for n in nets)


def _faster_in_channels_last(net: str, device_type: str) -> bool:
    own = NETWORK_EXCEPTIONS.get(device_type, {})
    if isinstance(net, str) and net in own:
        return own[net]
    return CHANNELS_LAST_FASTER[device_type].get(family_of(net), False)
