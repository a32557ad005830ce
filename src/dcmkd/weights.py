"""Reading and writing weight files safely.

Loading never executes code from a file: ``torch.load(..., weights_only=True)``. Writing is atomic:
the file is written next to its destination and renamed over it, so a crash during a save leaves
the previous file intact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU, with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or holding arbitrary objects
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from e


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a plain model's weights from an exported file, a run checkpoint holding
    ``{"state_dict": ...}`` / ``{"model": ...}``, or a multi-exit state dict (``backbone.*``).
    Auxiliary-classifier weights in the file are ignored; missing backbone weights are an error.
    """
    obj = load_file(path)
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{path} has {len(unexpected)} weights the model does not, "
                         f"e.g. {unexpected[:3]} (wrong architecture?)")
    return model
