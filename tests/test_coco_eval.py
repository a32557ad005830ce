"""COCO AP via pycocotools on hand-checked cases (dcmkd.metrics.coco)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dcmkd.metrics.coco import coco_evaluate, to_coco_results, write_results_json


def _gt(boxes, size=(200, 200), crowd=()):
    """One image (id 1), one category (id 7); boxes xywh; area = box area."""
    anns = [{"id": i + 1, "image_id": 1, "category_id": 7, "bbox": list(b), "area": b[2] * b[3],
             "iscrowd": int(i in crowd)} for i, b in enumerate(boxes)]
    return {"images": [{"id": 1, "width": size[0], "height": size[1]}], "annotations": anns,
            "categories": [{"id": 7, "name": "thing"}]}


def _det(box, score):
    return {"image_id": 1, "category_id": 7, "bbox": list(box), "score": score}


def test_perfect_detections_score_100_in_every_range():
    boxes = [(0, 0, 10, 10), (50, 50, 50, 40), (0, 100, 120, 100)]   # small, medium, large
    res = coco_evaluate(_gt(boxes), [_det(b, 0.9) for b in boxes])
    assert res == pytest.approx({k: 100.0 for k in ("AP", "AP50", "AP75", "APS", "APM", "APL")})


def test_iou_062_counts_at_three_of_ten_thresholds():
    # GT 10x10, detection 6.2x10 inside it: IoU = 62/100 -> matched at 0.50, 0.55, 0.60 only
    res = coco_evaluate(_gt([(0, 0, 10, 10)]), [_det((0, 0, 6.2, 10), 0.9)])
    assert res["AP50"] == pytest.approx(100.0)
    assert res["AP75"] == pytest.approx(0.0)
    assert res["AP"] == pytest.approx(30.0)
    assert res["APS"] == pytest.approx(30.0)
    assert math.isnan(res["APM"]) and math.isnan(res["APL"])   # no GT in those ranges


def test_false_positive_ranked_above_the_true_positive_halves_ap():
    gt = _gt([(10, 10, 50, 50)])
    above = coco_evaluate(gt, [_det((120, 120, 50, 50), 0.9), _det((10, 10, 50, 50), 0.8)])
    below = coco_evaluate(gt, [_det((120, 120, 50, 50), 0.7), _det((10, 10, 50, 50), 0.8)])
    # precision 1/2 at recall 1, interpolated back to recall 0 -> AP = 0.5
    assert above["AP"] == pytest.approx(50.0) and above["AP50"] == pytest.approx(50.0)
    assert below["AP"] == pytest.approx(100.0)


def test_size_ranges_split_a_found_small_and_a_missed_large_object():
    gt = _gt([(0, 0, 10, 10), (90, 90, 100, 100)])          # areas 100 (small), 10000 (large)
    res = coco_evaluate(gt, [_det((0, 0, 10, 10), 0.9)])
    assert res["APS"] == pytest.approx(100.0)
    assert res["APL"] == pytest.approx(0.0)
    assert math.isnan(res["APM"])
    # all areas: precision 1 up to recall 0.5 = 51 of the 101 recall points
    assert res["AP"] == pytest.approx(100 * 51 / 101)


def test_crowd_region_neither_counts_nor_penalises():
    gt = _gt([(0, 0, 20, 20), (100, 100, 80, 80)], crowd=(1,))
    res = coco_evaluate(gt, [_det((0, 0, 20, 20), 0.5), _det((110, 110, 40, 40), 0.9)])
    assert res["AP"] == pytest.approx(100.0)


def test_empty_results_are_zeros_and_foreign_images_one_line():
    assert coco_evaluate(_gt([(0, 0, 10, 10)]), []) == {
        k: 0.0 for k in ("AP", "AP50", "AP75", "APS", "APM", "APL")}
    with pytest.raises(ValueError, match="image_id 5, which is not in the ground truth"):
        coco_evaluate(_gt([(0, 0, 10, 10)]), [{**_det((0, 0, 5, 5), 1.0), "image_id": 5}])
    with pytest.raises(ValueError, match="has no 'score'"):
        coco_evaluate(_gt([(0, 0, 10, 10)]), [{"image_id": 1, "category_id": 7, "bbox": [0] * 4}])
    with pytest.raises(ValueError, match="no 'categories'"):
        coco_evaluate({"images": [], "annotations": []}, [])


def test_results_conversion_and_files_round_trip(tmp_path):
    res = to_coco_results([1], [torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 6.0, 9.0, 16.0]])],
                          [torch.tensor([0.9, 0.3])], [torch.tensor([2, 2])], {2: 7})
    assert res[1] == {"image_id": 1, "category_id": 7, "bbox": [5.0, 6.0, 4.0, 10.0],
                      "score": pytest.approx(0.3)}
    path = write_results_json(tmp_path / "run" / "detections.json", res)
    assert json.loads(path.read_text())[0]["bbox"] == [0.0, 0.0, 10.0, 10.0]
    assert [p.name for p in path.parent.iterdir()] == ["detections.json"]   # no temp file left
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(_gt([(0, 0, 10, 10)])))
    assert coco_evaluate(gt_path, path)["AP"] == pytest.approx(100.0)    # FP ranked below TP
    with pytest.raises(ValueError, match="label 3 of image 1 has no COCO category"):
        to_coco_results([1], [[[0, 0, 1, 1]]], [[0.5]], [[3]], {2: 7})
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        coco_evaluate(bad, [])
