"""Image classification: a batch is ``(images [B,3,H,W], labels [B])``, every network returns
the logits of each of its classifiers, a model is evaluated by the top-1 and top-5 error of every
classifier (both papers' tables report the final epoch's top-1 error of C1).

This module owns the metric keys of classification: ``train/net{n}/{C}/acc`` (training accuracy,
a fraction) and ``test/net{n}/{C}/top{k}`` (test error, %), see :func:`topk_key`.
"""
from __future__ import annotations

from typing import Any

import torch

from dcmkd.tasks.base import Evaluation, Task, batches_of, stacked_read, sum_over_processes


def topk_key(net: int, classifier: str = "C1", k: int = 1, prefix: str = "test") -> str:
    """The record key of classifier ``classifier`` of network ``net``'s top-``k`` test error
    (``prefix="val"``: on the validation split)."""
    return f"{prefix}/net{net}/{classifier}/top{k}"


def train_accuracy_key(net: int, classifier: str = "C1") -> str:
    return f"train/net{net}/{classifier}/acc"


class Classification(Task):
    """See the module note."""

    name = "classification"
    headline = "test_top1"
    headline_label = "top-1 error"
    lower_is_better = True

    def train_counts(self, outputs: list[list[Any]], targets: torch.Tensor,
                     names: list[list[str]]) -> dict[str, torch.Tensor]:
        counts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n, logits in enumerate(outputs):   # a method may leave a network out
                for name, z in zip(names[n], logits):
                    counts[train_accuracy_key(n, name)] = (z.argmax(1) == targets).sum()
        return counts

    @torch.no_grad()
    def evaluate(self, method: Any, batches: Any, ctx: Evaluation,
                 prefix: str = "test") -> dict[str, float]:
        """Top-1 and top-5 test error (%) of every classifier of every network (one host read;
        under torchrun each rank evaluates its share and the counts are summed)."""
        method.eval()
        misses: dict[str, torch.Tensor] = {}
        count = 0
        for x, y in batches_of(batches, ctx):
            x, y = self.to_device(x, y, ctx.device, ctx.channels_last)
            with ctx.autocast():
                logits = method.predict(x)
            for n, net in enumerate(logits):
                for name, z in zip(method.networks[n].classifier_names, net):
                    top = z.float().topk(min(5, z.shape[1]), dim=1).indices
                    hit = top.eq(y[:, None])
                    for k, h in ((1, hit[:, :1]), (5, hit)):
                        key = topk_key(n, name, k, prefix)
                        miss = (~h.any(1)).sum()
                        misses[key] = misses[key] + miss if key in misses else miss
            count += len(y)
        totals, count = sum_over_processes(stacked_read(misses), count, ctx.dist)
        return {k: 100.0 * v / max(count, 1) for k, v in totals.items()}

    def network_metric(self, record: dict[str, Any], n: int,
                       prefix: str = "test") -> float | None:
        return record.get(topk_key(n, prefix=prefix))

    def summary(self, evaluated: list[dict[str, Any]], networks: int) -> dict[str, Any]:
        out = super().summary(evaluated, networks)
        if out:
            out["test_top5"] = [evaluated[-1][topk_key(n, k=5)] for n in range(networks)]
        return out

    def result_text(self, summary: dict[str, Any]) -> str:
        errs = ", ".join(f"{n} {e:.2f}%" for n, e in zip(summary.get("nets", []),
                                                         summary.get("test_top1") or []))
        return f"test top-1 error {errs}"

    def epoch_text(self, record: dict[str, Any], networks: int) -> str | None:
        shown = [f"net{n} {record[topk_key(n)]:.2f}%" for n in range(networks)
                 if topk_key(n) in record]
        return f"test top-1 error {' '.join(shown)}" if shown else None


__all__ = ["Classification", "topk_key", "train_accuracy_key"]
