"""Plain supervised training of networks that compute their own task losses (a detector's loss
dict): the ``ind`` method of tasks other than classification (the "ResNet-18 … ResNet-152" rows
of SSKD Tables 8 and 9). A classifier's ``ind`` is :class:`~dcmkd.methods.mutual.MutualMethod`
with no links.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from dcmkd.methods.base import Method, StepOutput


class Supervised(Method):
    """Each network trained alone on its task's losses (``net{n}/{loss}``, summed)."""

    routes_networks = True

    def __init__(self, networks: Sequence[nn.Module], task: Any = None):
        super().__init__()
        for i, net in enumerate(networks):
            if not hasattr(net, "losses"):
                raise TypeError(f"network {i} ({type(net).__name__}) computes no task losses "
                                "(a classifier trains with method 'ind' of the mutual methods)")
        self.networks = nn.ModuleList(networks)
        self.frozen = frozenset()
        self.task = task

    def forward(self, inputs: Any, targets: Any) -> StepOutput:
        losses = {}
        for n in self.trainable_networks:
            for k, v in self.network(n)(inputs, targets).items():
                losses[f"net{n}/{k}"] = v
        return StepOutput(losses, [[] for _ in self.networks])


__all__ = ["Supervised"]
