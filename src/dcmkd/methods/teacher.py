"""Where a teacher's (or any pre-trained network's) weights come from: a file or a run folder.

``teacher_weights`` may name

- a weights file: an exported network (``net0_resnet56.pt``), a plain ``state_dict`` or a
  checkpoint holding ``{"state_dict": …}`` / ``{"model": …}``
  (:func:`dcmkd.weights.load_backbone_weights`);
- a finished run folder: its exported first network (``summary.json``'s ``exported[0]``).

``network = n`` picks network ``n`` of the run instead: of the folder given, or of the folder
holding the file given (so ``…/kd-run/net0_resnet34.pt`` with ``network=1`` is that run's
student, ``net1_resnet18.pt``). Files are always read with ``weights_only=True``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from dcmkd.weights import load_backbone_weights


def resolve_weights(spec: str | os.PathLike, network: int | None = None) -> Path:
    """The weights file that ``spec`` (file or run folder) and ``network`` designate."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"no weights file or run folder at {path}")
    if path.is_file() and network is None:
        return path
    folder = path if path.is_dir() else path.parent
    index = 0 if network is None else int(network)
    summary = folder / "summary.json"
    if summary.is_file():
        exported = json.loads(summary.read_text()).get("exported") or []
        if index >= len(exported):
            raise ValueError(f"{folder} exported {len(exported)} networks; there is no "
                             f"network {index}")
        return folder / exported[index]
    found = sorted(folder.glob(f"net{index}_*.pt"))
    if len(found) == 1:
        return found[0]
    if (folder / "checkpoint.pt").is_file():
        raise ValueError(f"the run in {folder} is not finished (no exported networks yet)")
    raise FileNotFoundError(f"{folder} holds no exported network {index} (net{index}_*.pt)")


def load_pretrained(model: nn.Module, spec: str | os.PathLike,
                    network: int | None = None) -> nn.Module:
    """Load ``model``'s weights from a file or run folder (see the module note)."""
    return load_backbone_weights(model, resolve_weights(spec, network))


__all__ = ["resolve_weights", "load_pretrained"]
