"""Writing files atomically and reading weight files safely.

Loading never executes code from a file: ``torch.load(..., weights_only=True)``. Writing is atomic:
the file is written next to its destination, flushed to disk and renamed over it, so a crash (or
a full disk) during a save leaves the previous file intact. New files get the usual permissions
(``0666`` minus the umask), not the ``0600`` of a temporary file.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from torch import nn


TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync, then rename it over
    ``path``; on any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if e.filename is None and e.errno is not None:   # say where (a full disk, say)
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from None
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def load_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with ``weights_only=True`` on the CPU, with a clear error for a bad file;
    a safetensors file (``.safetensors``, or a file that starts as one) is read with
    :func:`load_safetensors` (a dict of tensors; no code runs either way)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    magic = head[:2]
    if path.suffix == ".safetensors" or (magic[:2] != b"PK" and head[8:9] == b"{"):
        return load_safetensors(path)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":   # torch's zip archive, or a legacy pickle
        raise ValueError(f"{path} is not a weights file (neither torch.save's archive nor a "
                         "pickle)" + (": it is empty" if not magic else ""))
    if magic == b"PK" and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is a damaged weights file (a cut zip archive: an interrupted "
                         "copy, or a full disk): restore it, or delete it")
    try:
        with warnings.catch_warnings():   # torch's notes on pickle protocols mean nothing here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:   # the weights-only unpickler met something else
        raise ValueError(f"{path} holds objects other than tensors and plain containers, which "
                         "dcmkd will not load (it never runs code from a file); use a weights "
                         "file saved from a state_dict") from None
    except Exception as e:  # noqa: BLE001 - corrupt or truncated
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ValueError(f"{path} is not a readable weights file ({type(e).__name__}: "
                         f"{first}): restore it, or delete it") from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a JSON header, then raw tensor data: the format holds
    no code), read on the CPU with ``safetensors.torch.load_file``; one line naming the package
    when it is not installed, or the file when it is damaged."""
    path = Path(path)
    try:
        from safetensors.torch import load_file as read
    except ImportError:
        raise ValueError(f"{path} is a safetensors file: reading it needs the safetensors "
                         "package (pip install safetensors)") from None
    try:
        return dict(read(str(path), device="cpu"))
    except Exception as e:  # noqa: BLE001 - a damaged header or a cut file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"{path} is not a readable safetensors file ({first}): restore it, "
                         "or delete it") from None


def load_backbone_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a plain model's weights from an exported file, a checkpoint holding
    ``{"state_dict": ...}`` / ``{"model": ...}``, a dcmkd run's ``checkpoint.pt`` (its network 0:
    ``method`` → ``networks.0.*``), or a multi-exit state dict (``backbone.*``).
    Auxiliary-classifier weights in the file are ignored; missing backbone weights are an error.
    """
    obj = load_file(path)
    state = obj
    for key in ("state_dict", "model", "method"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    if any(k.startswith("networks.0.") for k in state):   # a method's: its first network
        state = {k[len("networks.0."):]: v for k, v in state.items()
                 if k.startswith("networks.0.")}
    own = model.state_dict()
    if any(k.startswith("backbone.") for k in state) and \
            not any(k.startswith("backbone.") for k in own):   # (a detector has its own)
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    if wrong:
        k, theirs, ours = wrong[0]
        raise ValueError(f"{path} does not fit the model: {k} is {list(theirs)} in the file but "
                         f"{list(ours)} in the model ({len(wrong)} such tensors; another class "
                         "count or architecture?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{path} has {len(unexpected)} weights the model does not, "
                         f"e.g. {unexpected[:3]} (wrong architecture?)")
    return model
