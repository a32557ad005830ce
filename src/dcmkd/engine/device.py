"""Running on a device: which device, the run's environment record, mixed precision and
``torch.compile``."""
from __future__ import annotations

import platform
import subprocess
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from dcmkd.version import __version__


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, else MPS, else CPU. A device that is not there is a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device '{name}' is not a device name (auto, cpu, cuda, cuda:N, "
                         "mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}': CUDA is not available on this machine "
                             "(use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise ValueError(f"device '{name}': MPS is not available on this machine")
    return device


def environment(device: torch.device) -> dict[str, Any]:
    """What is needed to rerun a run: package, git commit, torch, Python, device."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"dcmkd": __version__, "git_commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
            platform.processor() or platform.machine()}


class Precision:
    """Autocast for the forward pass and the loss (never the backward), and fp16 loss scaling."""

    def __init__(self, precision: str, device: torch.device):
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.device_type = device.type
        if precision == "fp16" and device.type == "cpu":
            warnings.warn("precision=fp16 on the CPU has no fast kernels: it trains many times "
                          "slower than fp32; use fp32, or bf16 on a CPU with bf16 instructions",
                          stacklevel=2)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class CompiledForward:
    """A network's ``forward`` through ``torch.compile``; if compiling fails, one line says why
    and the network runs eagerly from then on (the same call is answered eagerly)."""

    def __init__(self, network: nn.Module, log: Callable[[str], None]):
        self.eager = network.forward
        self.compiled = torch.compile(self.eager)
        self.failed: str | None = None
        self.log = log

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - judged by whether the eager call works
                out = self.eager(*args, **kwargs)   # an error of the model itself raises here
                first = (str(e).strip().splitlines() or [""])[0][:200]
                self.failed = f"{type(e).__name__}: {first}"
                self.log(f"compile=true: torch.compile failed ({self.failed}); this network "
                         "trains eagerly")
                return out
        return self.eager(*args, **kwargs)


def compile_networks(networks: nn.ModuleList, log: Callable[[str], None]) -> list[CompiledForward]:
    """Route each network's ``forward`` through :class:`CompiledForward` (state_dict keys and
    exported networks are unchanged: only the instance's ``forward`` is replaced)."""
    wrapped = []
    for net in networks:
        compiled = CompiledForward(net, log)
        net.forward = compiled   # type: ignore[method-assign]
        wrapped.append(compiled)
    return wrapped


__all__ = ["pick_device", "environment", "Precision", "CompiledForward", "compile_networks"]
