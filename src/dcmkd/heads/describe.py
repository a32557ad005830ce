"""Summaries of models and their classifiers (parameters, forward MACs, branch structure), as
plain dicts for ``dcmkd models`` / ``dcmkd describe`` and for programs.

MACs come from torch's own FLOP counter (``torch.utils.flop_counter``; MACs = FLOPs / 2) on a
batch of one at the model's native input size. Everything is built on the meta device: no
weights are allocated and no arithmetic runs, so this is fast even for ResNet-50.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

from dcmkd.heads.builder import MultiExitNetwork, build_multi_exit
from dcmkd.models.base import count_parameters
from dcmkd.models.registry import MODELS, create_model, list_models


def forward_macs(module: torch.nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one forward pass of a single image (module on any device)."""
    device = next(module.parameters()).device
    x = torch.empty(1, 3, input_size, input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops() // 2


def model_row(name: str, num_classes: int | None = None) -> dict:
    """One row of ``dcmkd models``."""
    entry = MODELS.get(name)
    with torch.device("meta"):
        model = create_model(name, num_classes)
    return {"name": name, "dataset": entry.dataset, "input_size": model.input_size,
            "num_classes": model.num_classes, "params": count_parameters(model),
            "macs": forward_macs(model.eval(), model.input_size), "summary": entry.summary}


def model_rows(num_classes: int | None = None) -> list[dict]:
    return [model_row(n, num_classes) for n in list_models()]


def describe_model(name: str, kind: str = "default", classifiers: str | Iterable[str] | None = None,
                   num_classes: int | None = None) -> dict:
    """The backbone's stages and, for each classifier, what it taps and builds."""
    with torch.device("meta"):
        net: MultiExitNetwork = build_multi_exit(name, num_classes, classifiers=classifiers,
                                                 kind=kind)
    backbone = net.backbone
    downs = net.downsamplings()
    out = {
        "name": name, "num_classes": backbone.num_classes, "input_size": backbone.input_size,
        "block_type": backbone.block_type, "kind": kind,
        "params_backbone": count_parameters(backbone),
        "params_total": count_parameters(net),
        "macs_backbone": forward_macs(backbone.eval(), backbone.input_size),
        "macs_total": forward_macs(net.eval(), backbone.input_size),
        "stages": [{"name": s.name, "channels": s.channels, "stride": s.stride,
                    **({"blocks": backbone.stage_specs[s.name].blocks}
                       if s.name in backbone.stage_specs else {})}
                   for s in backbone.stage_info],
        "classifiers": [{"name": "C1", "tap": backbone.stage_names[-1], "blocks": [],
                         "params": count_parameters(backbone.head),
                         "downsamplings": downs["C1"]}],
    }
    for cname, branch in net.branches.items():
        blocks = [] if branch.spec is None else [
            {"type": backbone.block_type, "count": s.blocks, "widths": list(s.block_widths),
             "stride": s.stride, **({"expansion": s.expansion} if s.expansion else {})}
            for s in branch.spec.stages]
        out["classifiers"].append({"name": cname, "tap": branch.tap, "blocks": blocks,
                                   "head_width": None if branch.spec is None
                                   else branch.spec.head_width,
                                   "params": count_parameters(branch),
                                   "downsamplings": downs[cname]})
    return out
