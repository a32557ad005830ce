"""Pascal VOC through the run config and the CLI (`dcmkd train -d voc`): the VOC splits by
default, the same COCO evaluation (VOC ground truth converted in memory), one-line refusals of
bad VOC folders; and the one-line count of images without boxes when a dataset is built."""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")

from dcmkd.cli import main  # noqa: E402
from dcmkd.data.detection import CocoDetection, VOC_CLASSES, VocDetection  # noqa: E402
from dcmkd.engine.config import resolve  # noqa: E402
from dcmkd.metrics.coco import coco_evaluate  # noqa: E402

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _object(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
            f"<xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>"
            "</object>")


def _voc_folder(root: Path, per_split: int = 4, empty: tuple[str, ...] = ()) -> Path:
    """A VOC2007-style folder: ``per_split`` images per split (trainval, test), each a bright
    square (a 'cat', red) and on odd images a second one (a 'dog', green) on a dark 64x64
    background; the ids in ``empty`` have no object."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    for s, split in enumerate(("trainval", "test")):
        ids = [f"{2007 + s}_{i:06d}" for i in range(per_split)]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, name in enumerate(ids):
            pixels = np.full((SIZE, SIZE, 3), 20, np.uint8)
            objects = []
            for j in range(0 if name in empty else 1 + i % 2):
                x, y = int(rng.integers(0, 30)), int(rng.integers(0, 30))
                w = int(rng.integers(12, 30))
                pixels[y:y + w, x:x + w] = (230, 60, 60) if j == 0 else (60, 230, 60)
                objects.append(_object("cat" if j == 0 else "dog", (x + 1, y + 1, x + w, y + w)))
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
            (root / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename><size><width>{SIZE}</width>"
                f"<height>{SIZE}</height><depth>3</depth></size>{''.join(objects)}"
                "</annotation>")
    return root


def _train(args: list[str]) -> int:
    return main(["train", *args, "device=cpu", "quiet=true", "schedule.name=constant"])


def test_a_voc_folder_trains_through_the_cli_and_is_scored_by_cocoeval(tmp_path, capsys):
    root = _voc_folder(tmp_path / "VOC2007", empty=("2007_000002",))
    out = tmp_path / "run"
    torch.manual_seed(0)
    assert _train(["-m", "ind", "-n", "resnet18", "-d", "voc", "--data-dir", str(root),
                   "-e", "1", "-o", str(out), "data.batch_size=2", "optim.lr=0.01",
                   "task.detector=retinanet", f"task.min_size={SIZE}",
                   f"task.max_size={SIZE}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "detection" and summary["nets"] == ["retinanet_resnet18"]
    coco = summary["test_coco"][0]
    assert set(coco) == {"AP", "AP50", "AP75", "APS", "APM", "APL"}
    printed = capsys.readouterr()
    assert printed.out.strip().splitlines()[-1] == \
        f"{out}: ind test AP retinanet_resnet18 {summary['test_AP'][0]:.2f}"
    assert printed.err.strip().splitlines().count(   # the negative image, said once
        f"dcmkd: warning: {root / 'ImageSets' / 'Main' / 'trainval.txt'}: 1 of 4 images have "
        "no boxes (kept as negatives)") == 1
    # VOC's default splits, written into the run's config and data identity
    cfg = (out / "config.yaml").read_text()
    assert "train_split: trainval" in cfg and "test_split: test" in cfg
    identity = json.loads((out / "data.json").read_text())
    assert (identity["name"], identity["train_images"], identity["test_images"]) == \
        ("voc", 4, 4)


def test_the_voc_test_split_is_scored_by_the_reference_cocoeval(tmp_path):
    from test_detection_task import _settings

    from dcmkd.engine.loop import fit
    from dcmkd.tasks.build import detection_data, detection_method

    root = _voc_folder(tmp_path / "VOC2007")
    data = detection_data(root, name="voc", batch_size=2, test_batch_size=2)
    assert (data.num_classes, data.classes) == (20, list(VOC_CLASSES))
    assert [len(data.train.dataset), len(data.test.dataset)] == [4, 4]
    torch.manual_seed(0)
    method = detection_method("ind", "retinanet", ["resnet18"], data.num_classes,
                              detector_options={"min_size": SIZE, "max_size": SIZE,
                                                "score_thresh": 0.001})
    summary = fit(method, data, tmp_path / "run", _settings())
    results = json.loads((tmp_path / "run" / "detections_net0.json").read_text())
    assert results and all(1 <= r["category_id"] <= 20 for r in results)   # VOC's own ids
    gt = VocDetection(root, "test").coco_gt()   # the test split's VOC boxes as COCO GT
    assert {r["image_id"] for r in results} <= {im["id"] for im in gt["images"]} == \
        {2008000000 + i for i in range(4)}
    rescored = coco_evaluate(gt, results)
    assert rescored == pytest.approx(summary["test_coco"][0], nan_ok=True)


def test_the_splits_default_to_the_datasets_and_a_given_split_is_kept():
    voc = resolve(None, ["data.name=voc", "data.root=x"])["task"]
    assert (voc["train_split"], voc["test_split"]) == ("trainval", "test")
    coco = resolve(None, ["data.name=coco", "data.root=x"])["task"]
    assert (coco["train_split"], coco["test_split"]) == ("train2017", "val2017")
    given = resolve(None, ["data.name=voc", "data.root=x", "task.train_split=train",
                           "task.test_split=val"])["task"]
    assert (given["train_split"], given["test_split"]) == ("train", "val")
    faces = resolve(None, ["data.name=faces", "data.root=x"])["task"]
    assert faces["train_split"] is None and faces["test_split"] is None   # not a detection key


@pytest.mark.parametrize("breakage, match", [
    ("no_root", r"data.name=voc needs data.root: the Pascal VOC folder such as "
                r"VOCdevkit/VOC2007 \(Annotations/\*.xml, JPEGImages/, "
                r"ImageSets/Main/<split>.txt\)$"),
    ("no_test_list", r"VOC image-set list .*ImageSets/Main/test.txt does not exist \(expected "
                     r"root/ImageSets/Main/test.txt\)$"),
    ("unknown_class", r"2007_000001.xml object #0: unknown class 'unicorn' \(not among the "
                      r"20 classes\)$"),
])
def test_a_bad_voc_folder_is_one_line_exit_2(tmp_path, capsys, breakage, match):
    root = _voc_folder(tmp_path / "VOC2007", per_split=2)
    if breakage == "no_test_list":
        (root / "ImageSets" / "Main" / "test.txt").unlink()
    if breakage == "unknown_class":
        (root / "Annotations" / "2007_000001.xml").write_text(
            f"<annotation><size><width>{SIZE}</width><height>{SIZE}</height></size>"
            f"{_object('unicorn', (1, 1, 9, 9))}</annotation>")
    where = [] if breakage == "no_root" else ["--data-dir", str(root)]
    assert _train(["-m", "ind", "-n", "resnet18", "-d", "voc", *where, "-e", "1",
                   "-o", str(tmp_path / "run"), "task.detector=retinanet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dcmkd: error: ")
    assert re.search(match, err[0]), err[0]


def _coco_with(tmp_path: Path, crowd_only: bool) -> Path:
    """4 COCO images: 1 and 2 with a box, 3 without any annotation, 4 with a crowd region only
    (``crowd_only``) or a box."""
    from PIL import Image

    root = tmp_path / "coco"
    (root / "images" / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in (1, 2, 3, 4):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(
            root / "images" / "train2017" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 16, "height": 16})
        if i != 3:
            anns.append({"id": 10 + i, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8],
                         "area": 64, "iscrowd": int(i == 4 and crowd_only)})
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    return root


def test_the_images_without_boxes_are_counted_in_one_warning(tmp_path):
    with pytest.warns(UserWarning) as seen:
        CocoDetection(_coco_with(tmp_path / "a", crowd_only=True))
    assert [str(w.message).split(": ", 1)[1] for w in seen] == [
        "2 of 4 images have no boxes (kept as negatives; 1 with crowd/difficult objects only)"]
    assert str(seen[0].message).startswith(str(tmp_path / "a" / "coco" / "annotations" /
                                               "instances_train2017.json"))
    with pytest.warns(UserWarning) as seen:
        CocoDetection(_coco_with(tmp_path / "b", crowd_only=False))
    assert [str(w.message).split(": ", 1)[1] for w in seen] == [
        "1 of 4 images have no boxes (kept as negatives)"]
    root = _voc_folder(tmp_path / "VOC2007", empty=("2008_000001", "2008_000003"))
    (root / "Annotations" / "2008_000000.xml").write_text(   # a difficult object alone
        f"<annotation><size><width>{SIZE}</width><height>{SIZE}</height></size>"
        f"{_object('cat', (1, 1, 9, 9), difficult=1)}</annotation>")
    with pytest.warns(UserWarning) as seen:
        VocDetection(root, "test")
    assert [str(w.message).split(": ", 1)[1] for w in seen] == [
        "3 of 4 images have no boxes (kept as negatives; 1 with crowd/difficult objects only)"]
    with pytest.warns(UserWarning) as seen:   # keep_difficult: the difficult cat is a box
        VocDetection(root, "test", keep_difficult=True)
    assert [str(w.message).split(": ", 1)[1] for w in seen] == [
        "2 of 4 images have no boxes (kept as negatives)"]
    with warnings.catch_warnings():   # every image with a box: silent
        warnings.simplefilter("error")
        VocDetection(_voc_folder(tmp_path / "full"), "trainval")
