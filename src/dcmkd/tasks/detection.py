"""Object detection (SSKD paper Tables 8 and 9): torchvision's Faster R-CNN + FPN and RetinaNet.

- **Batch**: ``(list of uint8 images [3,H,W], list of target dicts)`` from
  :class:`~dcmkd.data.detection.DetectionBatches`; on the device the images become floats in
  [0, 1], as torchvision's detectors expect (they normalise and resize themselves).
- **Network**: :class:`DetectorNetwork`, a detector of :func:`dcmkd.models.detection.build_detector`
  behind the interface the loop and the methods know: in training ``net(images, targets)``
  returns the detector's own loss dict, in evaluation its detections; :meth:`DetectorNetwork.
  stage_plan` cuts its backbone into SSKD's stages (:class:`~dcmkd.models.detection.ResNetFPNPlan`),
  :meth:`DetectorNetwork.head_modules` is its task head (RPN + RoI heads, or RetinaNet's
  subnets).
- **Evaluation** (:meth:`Detection.evaluate`): every network's detections on the test images, as
  a COCO results JSON in the run folder (``detections_net{n}.json``, so any tool can re-score
  them), scored by the reference COCOeval (pycocotools, :func:`dcmkd.metrics.coco.coco_evaluate`)
  against the test set's own ground truth: AP, AP50, AP75, APS, APM, APL (percent), keys
  ``test/net{n}/coco/{metric}``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcmkd.tasks.base import (Evaluation, Task, batches_of, computed_once,
                              gather_batches, move)

COCO_METRICS = ("AP", "AP50", "AP75", "APS", "APM", "APL")


def coco_key(net: int, metric: str, prefix: str = "test") -> str:
    return f"{prefix}/net{net}/coco/{metric}"


class DetectorNetwork(nn.Module):
    """A torchvision detector as a network of a method (see the module note)."""

    num_classifiers = 0   # (no classifier of its own: not a network-parallel mutual method)

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        spec = getattr(detector, "dcmkd_spec", {})
        self.model_name = f"{spec.get('kind', 'detector')}_{spec.get('backbone', '')}".rstrip("_")

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        return self.detector(images, targets)

    def losses(self, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """The detector's own training losses (it must be in training mode)."""
        return dict(self.detector(images, targets))

    def stage_plan(self, stages: Any = None) -> Any:
        """SSKD's stages of this detector's backbone: ResNet C2..C5, then the FPN (the only
        partition built; ``stages`` must be None, 5 or the default 4-stage request, see
        :class:`~dcmkd.models.detection.ResNetFPNPlan`)."""
        from dcmkd.models.detection import ResNetFPNPlan

        plan = ResNetFPNPlan(self.detector)
        if stages not in (None, 4, len(plan)):
            raise ValueError(f"a ResNet-FPN detector has the {len(plan)} stages "
                             f"{', '.join(plan.names)}; sskd.stages={stages!r} is not supported "
                             "for detectors (leave it at its default)")
        return plan

    def prepare(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The detector's own preprocessing (normalise, resize, pad into one batch tensor): the
        input of stage 1, the same for a teacher with the same transform settings."""
        from dcmkd.models.detection import preprocess

        return preprocess(self.detector, images)[0].tensors

    def head_modules(self) -> list[nn.Module]:
        from dcmkd.models.detection import head_modules

        return head_modules(self.detector)

    def backbone_modules(self) -> list[nn.Module]:
        return [self.detector.backbone]

    def export(self) -> nn.Module:
        return self.detector


class Detection(Task):
    """See the module note. ``score_threshold``: detections below it are not written (the COCO
    protocol keeps up to 100 per image, which the detectors' own ``detections_per_img`` sets)."""

    name = "detection"
    headline = "test_AP"
    headline_label = "AP"
    lower_is_better = False

    def __init__(self, label_to_category: dict[int, int] | None = None):
        self.label_to_category = label_to_category

    def to_device(self, inputs: Any, targets: Any, device: torch.device,
                  channels_last: bool = False) -> tuple[Any, Any]:
        images = [im.to(device, non_blocking=True).float().div_(255.0) if im.dtype == torch.uint8
                  else im.to(device, non_blocking=True) for im in inputs]
        return images, move(targets, device)

    def batch_size(self, inputs: Any, targets: Any) -> int:
        return len(inputs)

    @torch.no_grad()
    def evaluate(self, method: Any, batches: Any, ctx: Evaluation,
                 prefix: str = "test") -> dict[str, float]:
        """COCO AP of every network; the results JSON goes to the run folder for the test
        set only (``prefix="test"``).

        Under torchrun each rank detects on its own whole test batches (a
        :class:`~dcmkd.tasks.base.BatchShard`), the detection records are gathered to rank 0
        in the single-process order, and rank 0 writes the results JSON and runs COCOeval
        once, giving the metrics to every rank. **Choice** (over rank 0 detecting on every
        image while the others wait): the detector's forward passes are the cost and are
        shared; COCOeval, which needs every image's detections, runs once. The batches are the
        single-process ones (a detector pads a batch to its largest image, so a detection
        depends on its batch mates) and the order is restored (COCOeval breaks score ties by
        the order of the results), so the JSON and the metrics are those of one process on
        the same weights."""
        from dcmkd.metrics.coco import coco_evaluate, to_coco_results, write_results_json

        dataset = getattr(batches, "dataset", None)
        if dataset is None or not hasattr(dataset, "coco_gt"):
            raise ValueError("detection evaluation needs test batches over a dataset with a "
                             "COCO ground truth (dcmkd.data.detection.DetectionBatches)")
        method.eval()
        mapping = self.label_to_category or dataset.label_to_category
        mine: list[list[list[dict]]] = []   # per batch, per network: COCO result records
        for images, targets in batches_of(batches, ctx):
            images, targets = self.to_device(images, targets, ctx.device)
            ids = [int(t["image_id"]) for t in targets]
            batch: list[list[dict]] = []
            with ctx.autocast():
                for net in method.networks:
                    dets = net(images)
                    keep = [d["labels"] > 0 for d in dets]   # a RetinaNet may emit label 0
                    batch.append(to_coco_results(
                        ids, [d["boxes"][k].float().cpu() for d, k in zip(dets, keep)],
                        [d["scores"][k].float().cpu() for d, k in zip(dets, keep)],
                        [d["labels"][k].cpu() for d, k in zip(dets, keep)], mapping))
            mine.append(batch)
        parts = gather_batches(mine, batches, ctx.dist)

        def metrics() -> dict[str, float]:
            assert parts is not None   # rank 0
            gt = dataset.coco_gt()
            out: dict[str, float] = {}
            for n in range(len(method.networks)):
                res = [r for batch in parts for r in batch[n]]
                if ctx.out_dir is not None and prefix == "test":
                    write_results_json(Path(ctx.out_dir) / f"detections_net{n}.json", res)
                for k, v in coco_evaluate(gt, res).items():
                    out[coco_key(n, k, prefix)] = float(v)
            return out

        return computed_once(ctx.dist, metrics)

    def network_metric(self, record: dict[str, Any], n: int,
                       prefix: str = "test") -> float | None:
        v = record.get(coco_key(n, "AP", prefix))
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def summary(self, evaluated: list[dict[str, Any]], networks: int) -> dict[str, Any]:
        out = super().summary(evaluated, networks)
        if out:
            last = evaluated[-1]
            out["test_coco"] = [{k: last.get(coco_key(n, k)) for k in COCO_METRICS}
                                for n in range(networks)]
        return out

    def epoch_text(self, record: dict[str, Any], networks: int) -> str | None:
        shown = [f"net{n} AP {record[coco_key(n, 'AP')]:.1f} AP50 "
                 f"{record[coco_key(n, 'AP50')]:.1f}"
                 for n in range(networks) if coco_key(n, "AP") in record]
        return "test " + ", ".join(shown) if shown else None


__all__ = ["Detection", "DetectorNetwork", "coco_key", "COCO_METRICS"]
