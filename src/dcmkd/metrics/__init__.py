"""Evaluation metrics beyond classification accuracy."""
from __future__ import annotations

from dcmkd.metrics.coco import COCO_METRICS, coco_evaluate, to_coco_results, write_results_json

__all__ = ["COCO_METRICS", "coco_evaluate", "to_coco_results", "write_results_json"]
