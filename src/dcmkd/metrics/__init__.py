"""Evaluation metrics beyond classification accuracy."""
from __future__ import annotations

from dcmkd.metrics.coco import COCO_METRICS, coco_evaluate, to_coco_results, write_results_json

__all__ = ["COCO_METRICS", "coco_evaluate", "to_coco_results", "write_results_json"]

from dcmkd.metrics.face import (all_pairs, cosine_similarity_matrix, evaluate_face,  # noqa: E402
                                evaluate_ijba, evaluate_ijba_splits,
                                identification_rates, ijba_sightings, mean_std,
                                open_set_gallery_split, pool_templates, tar_at_far)

__all__ += ["all_pairs", "cosine_similarity_matrix", "evaluate_face", "evaluate_ijba",
            "evaluate_ijba_splits", "identification_rates", "ijba_sightings", "mean_std",
            "open_set_gallery_split", "pool_templates", "tar_at_far"]
