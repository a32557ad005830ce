"""COCO box AP with the reference evaluation, pycocotools' ``COCOeval``.

The six numbers of the SSKD paper's Tables 8-9 (Gao et al., "An Embarrassingly Simple Approach
for Knowledge Distillation", COCO detection with FPN and RetinaNet, Detectron's metrics): AP
(mean over the ten IoU thresholds 0.50:0.05:0.95), AP50, AP75, and AP over small (area < 32²),
medium (32²..96²) and large (> 96²) objects, as defined by the COCO detection evaluation (Lin et
al., "Microsoft COCO: Common Objects in Context", ECCV 2014; cocodataset.org/#detection-eval), all
in percent.

Why pycocotools and not faster-coco-eval (both install here): pycocotools is the COCO team's own
implementation, the one torchvision's detection references (``references/detection/coco_eval.py``)
and Detectron/Detectron2 (whose faster C++ evaluator is checked against it) report with; results
scored here are then comparable with those papers by construction. faster-coco-eval is a faster
re-implementation that aims at identical numbers; the speed-up matters for many evaluations of
the full 5,000-image minival, not for the evaluations this project runs, and the reference leaves
no doubt about the numbers.

Decisions where pycocotools is silent or awkward:
- empty results (a detector that found nothing) give 0.0 for every metric instead of
  pycocotools' crash in ``loadRes``;
- pycocotools reports -1 for a size range (or a whole set) without ground truth; it is reported
  here as NaN (the key stays, so tables keep their columns; NaN is "not defined", not 0);
- pycocotools' progress prints are suppressed;
- results naming an image absent from the ground truth are an error (one line).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

#: the metric keys, in the order of ``COCOeval.stats[:6]``
COCO_METRICS = ("AP", "AP50", "AP75", "APS", "APM", "APL")


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(x, dtype=dtype)


def to_coco_results(image_ids: Sequence[int], boxes_xyxy: Sequence[Any], scores: Sequence[Any],
                    labels: Sequence[Any], label_to_category: Mapping[int, int]) -> list[dict]:
    """Detections as COCO results: one dict per box ``{image_id, category_id, bbox (x, y, w, h),
    score}``.

    Per image ``i``: ``boxes_xyxy[i]`` ``[N,4]`` (x1, y1, x2, y2 pixels), ``scores[i]`` ``[N]``,
    ``labels[i]`` ``[N]`` contiguous labels mapped to COCO category ids by ``label_to_category``
    (e.g. :attr:`dcmkd.data.detection.CocoDetection.label_to_category`).
    """
    if not len(image_ids) == len(boxes_xyxy) == len(scores) == len(labels):
        raise ValueError(f"to_coco_results: {len(image_ids)} image ids but {len(boxes_xyxy)} box "
                         f"sets, {len(scores)} score sets and {len(labels)} label sets")
    out: list[dict] = []
    for image_id, b, s, lab in zip(image_ids, boxes_xyxy, scores, labels):
        b = _as_tensor(b, torch.float64).reshape(-1, 4)
        s = _as_tensor(s, torch.float64).reshape(-1)
        lab = _as_tensor(lab, torch.int64).reshape(-1)
        if not len(b) == len(s) == len(lab):
            raise ValueError(f"to_coco_results: image {image_id} has {len(b)} boxes, {len(s)} "
                             f"scores and {len(lab)} labels (expected equal counts)")
        for (x1, y1, x2, y2), score, label in zip(b.tolist(), s.tolist(), lab.tolist()):
            if label not in label_to_category:
                raise ValueError(f"to_coco_results: label {label} of image {image_id} has no COCO "
                                 f"category (known labels {min(label_to_category)}.."
                                 f"{max(label_to_category)})")
            out.append({"image_id": int(image_id), "category_id": int(label_to_category[label]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return out


def write_results_json(path: str | os.PathLike, results: list[dict]) -> Path:
    """Write COCO results to ``path`` atomically (a temporary file in the same folder, then a
    rename), so a reader never sees half a file. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _load_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None


def _coco_from_dict(gt: dict):
    from pycocotools.coco import COCO

    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"COCO ground truth has no '{key}' list")
    coco = COCO()
    coco.dataset = dict(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt: dict | str | os.PathLike, results: list | str | os.PathLike
                  ) -> dict[str, float]:
    """COCO box AP of ``results`` against ``gt`` (a COCO ground-truth dict such as
    ``CocoDetection.coco_gt()``, or the path of an ``instances_*.json``).

    Returns ``{AP, AP50, AP75, APS, APM, APL}`` in percent; NaN where the ground truth has no
    object in the range; zeros for empty results. Evaluated on every image of ``gt``.
    """
    from pycocotools.cocoeval import COCOeval

    if not isinstance(gt, dict):
        gt = _load_json(gt, "COCO ground-truth")
    if not isinstance(results, list):
        results = _load_json(results, "COCO results")
        if not isinstance(results, list):
            raise ValueError("COCO results file must hold a list of detections")
    coco_gt = _coco_from_dict(gt)
    if not results:
        return {k: 0.0 for k in COCO_METRICS}
    known = set(coco_gt.getImgIds())
    for r in results:
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in r]
        if missing:
            raise ValueError(f"COCO result {r!r:.80} has no '{missing[0]}'")
        if r["image_id"] not in known:
            raise ValueError(f"COCO result for image_id {r['image_id']}, which is not in the "
                             f"ground truth ({len(known)} images)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys: copy
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (math.nan if v < 0 else float(v) * 100.0)
            for k, v in zip(COCO_METRICS, ev.stats[:6])}


__all__ = ["COCO_METRICS", "to_coco_results", "write_results_json", "coco_evaluate"]
