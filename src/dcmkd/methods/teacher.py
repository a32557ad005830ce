"""Where a teacher's (or any pre-trained network's) weights come from: a file or a run folder.

``teacher_weights`` may name

- a weights file: an exported network (``net0_resnet56.pt``), a plain ``state_dict`` or a
  checkpoint holding ``{"state_dict": …}`` / ``{"model": …}``
  (:func:`dcmkd.weights.load_backbone_weights`);
- a finished run folder: its exported first network.

``network = n`` picks network ``n`` of the run instead: of the folder given, or of the folder
holding the file given (:func:`dcmkd.run_folder.resolve_weights`). Files are always read with
``weights_only=True``.
"""
from __future__ import annotations

import os

from torch import nn

from dcmkd.run_folder import resolve_weights
from dcmkd.weights import load_backbone_weights


def load_pretrained(model: nn.Module, spec: str | os.PathLike,
                    network: int | None = None) -> nn.Module:
    """Load ``model``'s weights from a file or run folder (see the module note)."""
    return load_backbone_weights(model, resolve_weights(spec, network))


__all__ = ["resolve_weights", "load_pretrained"]
