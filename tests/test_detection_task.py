"""The detection task end to end (SSKD Tables 8–9 in small): torchvision detectors trained by the
one loop, COCO results JSON in the run folder, SSKD stage by stage on a ResNet-FPN with the
teacher from a run folder, and a head phase that leaves the backbone untouched."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from dcmkd.engine.loop import fit  # noqa: E402
from dcmkd.engine.settings import TrainSettings  # noqa: E402
from dcmkd.methods.optimization import Schedule, SGDSettings  # noqa: E402
from dcmkd.metrics.coco import coco_evaluate  # noqa: E402
from dcmkd.tasks.build import detection_data, detection_method  # noqa: E402

SIZE = 64
OPTS = dict(min_size=SIZE, max_size=SIZE)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _coco_folder(root: Path, images: int = 4) -> Path:
    """Bright squares on a dark background, one or two per image, two categories."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        imgs, anns = [], []
        for i in range(images):
            pixels = np.full((SIZE, SIZE, 3), 20, np.uint8)
            for j in range(1 + i % 2):
                x, y = int(rng.integers(0, 30)), int(rng.integers(0, 30))
                w = int(rng.integers(12, 30))
                pixels[y:y + w, x:x + w] = (230, 60, 60) if j == 0 else (60, 230, 60)
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 3 + 4 * j,
                             "bbox": [x, y, w, w], "area": w * w, "iscrowd": 0})
            Image.fromarray(pixels).save(root / "images" / split / f"{i:03d}.png")
            imgs.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": SIZE,
                         "height": SIZE})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": imgs, "annotations": anns,
            "categories": [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]}))
    return root


def _settings(epochs: int = 1) -> TrainSettings:
    return TrainSettings(optim=SGDSettings(0.9, False, 1e-4),
                         schedule=Schedule("constant", lr=0.01, epochs=epochs), device="cpu",
                         quiet=True, clip_grad_norm=10.0)


def test_a_detector_trains_and_writes_a_coco_results_json_any_tool_can_rescore(tmp_path):
    root = _coco_folder(tmp_path / "coco")
    data = detection_data(root, batch_size=2, test_batch_size=2)
    assert data.num_classes == 2 and data.classes == ["red", "green"]
    torch.manual_seed(0)
    method = detection_method("ind", "fasterrcnn", ["resnet18"], data.num_classes,
                              detector_options=OPTS)
    summary = fit(method, data, tmp_path / "run", _settings())
    assert summary["method"] == "ind" and summary["task"] == "detection"
    assert summary["nets"] == ["fasterrcnn_resnet18"]
    coco = summary["test_coco"][0]
    assert set(coco) == {"AP", "AP50", "AP75", "APS", "APM", "APL"}
    results = json.loads((tmp_path / "run" / "detections_net0.json").read_text())
    assert all(r["category_id"] in (3, 7) for r in results)   # the dataset's own category ids
    # the JSON rescored by the reference COCOeval gives the run's own figures
    rescored = coco_evaluate(data.test.dataset.coco_gt(), results)
    assert rescored["AP"] == pytest.approx(coco["AP"]) and summary["test_AP"] == [coco["AP"]]
    state = torch.load(tmp_path / "run" / summary["exported"][0], weights_only=True)
    assert "backbone.fpn.inner_blocks.0.0.weight" in state   # torchvision's own keys


def test_sskd_on_a_retinanet_trains_stage_by_stage_then_the_head(tmp_path):
    root = _coco_folder(tmp_path / "coco")
    data = detection_data(root, batch_size=2, test_batch_size=2)
    torch.manual_seed(0)
    teacher = detection_method("ind", "retinanet", ["resnet34"], data.num_classes,
                               detector_options=OPTS)
    fit(teacher, data, tmp_path / "teacher", _settings())
    method = detection_method("sskd", "retinanet", ["resnet34", "resnet18"], data.num_classes,
                              teacher_weights=tmp_path / "teacher", detector_options=OPTS,
                              sskd={"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1})
    assert method.s_part.names == ["conv1+layer1", "layer2", "layer3", "layer4", "fpn"]
    for k, v in teacher.networks[0].state_dict().items():   # the teacher came from its run
        assert torch.equal(method.networks[0].state_dict()[k], v), k
    summary = fit(method, data, tmp_path / "sskd", _settings())
    records = [json.loads(x) for x in (tmp_path / "sskd" / "metrics.jsonl").open()]
    assert [r["sskd/phase"] for r in records] == [
        "stage1", "stage2", "stage3", "stage4", "stage5", "head"]
    assert "train/net1/stage5" in records[4]          # the pyramid stage's mimic loss
    assert {"train/net1/classification", "train/net1/bbox_regression"} <= set(records[5])
    assert len(summary["test_coco"]) == 2


def test_the_head_phase_leaves_every_backbone_parameter_and_buffer_unchanged(tmp_path):
    root = _coco_folder(tmp_path / "coco")
    data = detection_data(root, batch_size=2, test_batch_size=2)
    torch.manual_seed(0)
    method = detection_method("sskd", "fasterrcnn", ["resnet18", "resnet18"], data.num_classes,
                              detector_options={**OPTS, "norm": "bn"},
                              sskd={"schedule": "epochs", "stage_epochs": 1, "head_epochs": 1})
    method.configure_optimization(SGDSettings(0.9, False, 1e-4),
                                  Schedule("constant", lr=0.05, epochs=1))
    for _ in range(5):   # to the head phase, as end_epoch does
        method.end_epoch(0)
    assert method.phase.kind == "head"
    method.train()
    student = method.networks[1].detector
    backbone = {k: v.clone() for k, v in student.backbone.state_dict().items()}
    head = {k: v.clone() for k, v in student.rpn.state_dict().items()}
    images, targets = next(iter(data.train.epoch(0)))
    images, targets = method.task.to_device(images, targets, torch.device("cpu"))

    def step(loss, terms):
        method.optimizer.zero_grad()
        loss.backward()
        method.optimizer.step()

    method.begin_step(5.0)
    out = method.training_step(images, targets, step)
    assert {"net1/loss_classifier", "net1/loss_objectness"} <= set(out.losses)
    for k, v in student.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert any(not torch.equal(v, head[k]) for k, v in student.rpn.state_dict().items())


def test_teacher_and_student_of_different_detectors_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        from dcmkd.methods.sskd import SSKD
        from dcmkd.models.detection import build_detector
        from dcmkd.tasks.detection import DetectorNetwork

        SSKD(DetectorNetwork(build_detector("retinanet", "resnet18", 3, min_size=64,
                                            max_size=64)),
             DetectorNetwork(build_detector("retinanet", "resnet18", 3, min_size=96,
                                            max_size=96)))
    with pytest.raises(ValueError, match="KD does not apply to detection"):
        detection_method("kd", "retinanet", ["resnet18", "resnet18"], 2, detector_options=OPTS)
