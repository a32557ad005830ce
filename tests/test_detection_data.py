"""COCO/VOC detection readers, their validation and DetectionBatches (dcmkd.data.detection)."""
from __future__ import annotations

import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcmkd.data.detection import CocoDetection, DetectionBatches, VocDetection, hflip
from dcmkd.metrics.coco import coco_evaluate

COCO_TAR = Path(__file__).parents[2] / "shared" / "data" / "coco-subset.tar"


def _pixels(k: int, size=(32, 32)) -> np.ndarray:
    h, w = size
    return ((np.arange(h * w * 3).reshape(h, w, 3) * (k + 3)) % 251).astype(np.uint8)


def _coco(tmp_path: Path, anns=None, images=None, layout="images", split="train2017",
          categories=None) -> Path:
    """A COCO folder: 3 images 32x32 (id 1, 2, 5; id 5 has no box), categories 3 and 9."""
    root = tmp_path / "coco"
    folder = root / "images" / split if layout == "images" else root / split
    folder.mkdir(parents=True)
    images = images if images is not None else [
        {"id": i, "file_name": f"{i:03d}.png", "width": 32, "height": 32} for i in (1, 2, 5)]
    for im in images:
        Image.fromarray(_pixels(im["id"], (im["height"], im["width"]))).save(
            folder / im["file_name"])
    if anns is None:
        anns = [{"id": 10, "image_id": 1, "category_id": 9, "bbox": [2, 3, 10, 20], "area": 150,
                 "iscrowd": 0},
                {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 0, 12, 12],
                 "area": 144, "iscrowd": 0},
                {"id": 12, "image_id": 1, "category_id": 3, "bbox": [0, 24, 32, 8], "area": 200,
                 "iscrowd": 1},
                {"id": 13, "image_id": 2, "category_id": 3, "bbox": [4, 4, 8, 8], "area": 64,
                 "iscrowd": 0}]
    (root / "annotations").mkdir()
    data = {"images": images, "annotations": anns,
            "categories": categories or [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


def _ann(**kw):
    return [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25,
             "iscrowd": 0, **kw}]


def test_coco_items_labels_crowd_and_negative_image(tmp_path):
    ds = CocoDetection(_coco(tmp_path), "train2017")
    assert len(ds) == 3 and ds.num_classes == 2
    assert ds.categories == [(1, 3, "three"), (2, 9, "nine")]
    assert ds.label_to_category == {1: 3, 2: 9}
    img, t = ds[0]
    assert img.dtype == torch.uint8
    assert torch.equal(img, torch.from_numpy(_pixels(1)).permute(2, 0, 1))
    assert t["image_id"] == 1
    assert torch.equal(t["boxes"], torch.tensor([[2.0, 3.0, 12.0, 23.0], [20.0, 0.0, 32.0, 12.0]]))
    assert t["labels"].tolist() == [2, 1]                 # crowd annotation 12 left out
    assert t["area"].tolist() == [150.0, 144.0] and t["iscrowd"].tolist() == [0, 0]
    _, neg = ds[2]
    assert neg["image_id"] == 5 and neg["boxes"].shape == (0, 4) and neg["labels"].shape == (0,)
    gt = ds.coco_gt()
    assert [a["id"] for a in gt["annotations"]] == [10, 11, 12, 13]
    assert gt["annotations"][2]["iscrowd"] == 1 and gt["annotations"][2]["category_id"] == 3
    assert [im["id"] for im in gt["images"]] == [1, 2, 5]
    # the targets scored against coco_gt as detections: perfect
    res = [{"image_id": t["image_id"], "category_id": ds.label_to_category[int(lab)],
            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": 1.0}
           for _, t in (ds[i] for i in range(len(ds)))
           for b, lab in zip(t["boxes"].tolist(), t["labels"])]
    assert coco_evaluate(gt, res)["AP"] == pytest.approx(100.0)


def test_coco_official_layout_and_resize(tmp_path):
    ds = CocoDetection(_coco(tmp_path, layout="official", split="val2017"), "val2017",
                       min_size=64, cache=True)
    img, t = ds[1]
    assert img.shape == (3, 64, 64) and ds.size(1) == (64, 64)
    assert torch.equal(t["boxes"], torch.tensor([[8.0, 8.0, 24.0, 24.0]]))
    assert t["area"].tolist() == [256.0]
    assert ds.coco_gt()["annotations"][3]["bbox"] == [8.0, 8.0, 16.0, 16.0]
    assert ds.image(1) is ds.image(1)                       # cached
    small = CocoDetection(_coco(tmp_path / "b"), max_size=16)
    assert small[0][0].shape == (3, 16, 16)


def test_coco_box_rounding_is_clipped_and_zero_area_dropped(tmp_path):
    anns = _ann(bbox=[-0.5, 2, 32.8, 5]) + [{**_ann()[0], "id": 8, "bbox": [3, 3, 0, 4]}]
    with pytest.warns(UserWarning, match=r"dropped 1 box\(es\) of zero width or height "
                                         r"\(annotation ids \[8\]\)"):
        ds = CocoDetection(_coco(tmp_path, anns=anns))
    assert ds[0][1]["boxes"].tolist() == [[0.0, 2.0, 32.0, 7.0]]


@pytest.mark.parametrize("anns, error, match", [
    (_ann(bbox=[20, 1, 15, 5]), ValueError,
     r"instances_train2017.json: annotation id 7 \(image 001.png\): box .* lies outside the "
     r"32x32 image"),
    (_ann(bbox=[1, 1, -3, 5]), ValueError, "annotation id 7 .*negative width or height"),
    (_ann(category_id=4), ValueError, "annotation id 7: unknown category_id 4"),
    (_ann(image_id=99), ValueError, "annotation id 7: image_id 99 is not among the images"),
    ([{"id": 7, "image_id": 1, "category_id": 3}], ValueError,
     "instances_train2017.json: annotation id 7 has no 'bbox'"),
    (_ann(bbox=[1, 1, 5]), ValueError, r"annotation id 7: bbox \[1, 1, 5\] is not"),
])
def test_coco_bad_annotations_one_line(tmp_path, anns, error, match):
    with pytest.raises(error, match=match) as e:
        CocoDetection(_coco(tmp_path, anns=anns))
    assert "\n" not in str(e.value)


def test_coco_bad_files_one_line(tmp_path):
    root = _coco(tmp_path)
    (root / "images" / "train2017" / "005.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot decode image .*005.png"):
        CocoDetection(root)[2]
    (root / "images" / "train2017" / "002.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image id 2: image file .*002.png does not exist"):
        CocoDetection(root)
    with pytest.raises(FileNotFoundError, match="instances_val2017.json does not exist"):
        CocoDetection(root, "val2017")
    ann = root / "annotations" / "instances_train2017.json"
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_train2017.json is not valid JSON"):
        CocoDetection(root)
    ann.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="instances_train2017.json has no 'categories'"):
        CocoDetection(root)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "001.png", "width": 32}],
                               "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="image id 1 has no 'height'"):
        CocoDetection(root)
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "001.png", "width": 40,
                                           "height": 32}], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="001.png is 32x32 but its annotation says 40x32"):
        CocoDetection(root)[0]


def _voc(tmp_path: Path, objects: str | None = None, ids=("000005", "000007")) -> Path:
    root = tmp_path / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    default = ("<object><name>dog</name><difficult>0</difficult><bndbox><xmin>3</xmin>"
               "<ymin>5</ymin><xmax>20</xmax><ymax>30</ymax></bndbox></object>"
               "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin>"
               "<ymin>1</ymin><xmax>8</xmax><ymax>8</ymax></bndbox></object>")
    for k, name in enumerate(ids):
        Image.fromarray(_pixels(k, (32, 40))).save(root / "JPEGImages" / f"{name}.jpg")
        objs = (default if objects is None else objects) if k == 0 else ""
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>40</width>"
            f"<height>32</height><depth>3</depth></size>{objs}</annotation>")
    return root


def test_voc_items_difficult_and_coco_gt(tmp_path):
    ds = VocDetection(_voc(tmp_path))
    assert len(ds) == 2 and ds.num_classes == 20
    img, t = ds[0]
    assert img.shape == (3, 32, 40) and t["image_id"] == 5
    assert t["boxes"].tolist() == [[2.0, 4.0, 20.0, 30.0]]     # 1-based -> continuous
    assert t["labels"].tolist() == [12]                        # dog; the difficult cat left out
    gt = ds.coco_gt()
    assert [(a["category_id"], a["iscrowd"], a["bbox"]) for a in gt["annotations"]] == [
        (12, 0, [2.0, 4.0, 18.0, 26.0]), (8, 1, [0.0, 0.0, 8.0, 8.0])]
    assert ds[1][1]["boxes"].shape == (0, 4)                   # an image without objects
    keep = VocDetection(_voc(tmp_path / "k"), keep_difficult=True)
    assert keep[0][1]["labels"].tolist() == [12, 8]
    mine = VocDetection(_voc(tmp_path / "m", ids=("a", "b")), classes=("cat", "dog"))
    assert [r.image_id for r in mine.images] == [1, 2] and mine[0][1]["labels"].tolist() == [2]


@pytest.mark.parametrize("objects, match", [
    ("<object><name>unicorn</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
     "<ymax>5</ymax></bndbox></object>", r"000005.xml object #0: unknown class 'unicorn'"),
    ("<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>45</xmax>"
     "<ymax>5</ymax></bndbox></object>", r"000005.xml object #0: box .* lies outside the 40x32"),
    ("<object><name>dog</name></object>", r"000005.xml object #0 has no <bndbox>"),
    ("<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox>"
     "</object>", r"000005.xml object #0 <bndbox> has no <ymax>"),
    ("<object><name>dog</name>", r"000005.xml is not valid XML"),
])
def test_voc_bad_annotations_one_line(tmp_path, objects, match):
    with pytest.raises(ValueError, match=match) as e:
        VocDetection(_voc(tmp_path, objects))
    assert "\n" not in str(e.value)


def test_voc_missing_files(tmp_path):
    root = _voc(tmp_path)
    (root / "JPEGImages" / "000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000007.xml: image file .*000007.jpg does not"):
        VocDetection(root)
    (root / "Annotations" / "000005.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"VOC annotation .*000005.xml does not exist"):
        VocDetection(root)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/test.txt does not exist"):
        VocDetection(root, "test")


class _Items:
    """A stand-in dataset: item i is an 8x10 image filled with i and one box."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        img = torch.full((3, 8, 10), i, dtype=torch.uint8)
        img[:, :, 0] = 255
        return img, {"boxes": torch.tensor([[1.0, 2.0, 4.0, 6.0]]), "labels": torch.tensor([1]),
                     "image_id": i}


def _ids(batch):
    return [t["image_id"] for t in batch[1]]


def test_batches_order_resume_flip_and_shards():
    b = DetectionBatches(_Items(), 4, seed=3, flip=True)
    assert len(b) == 2 and b.num_samples == 10 and b.batch_size == 4
    e0 = list(b.epoch(0))
    assert [_ids(x) for x in e0] == [_ids(x) for x in DetectionBatches(
        _Items(), 4, seed=3, flip=True).epoch(0)]
    assert _ids(e0[0]) == b.order(0)[:4] and b.order(0) != b.order(1)
    resumed = list(b.epoch(0, start_batch=1))
    assert len(resumed) == 1 and _ids(resumed[0]) == _ids(e0[1])
    assert all(torch.equal(x, y) for x, y in zip(resumed[0][0], e0[1][0]))
    flips = [b.flipped(0, i) for i in range(10)]
    assert 0 < sum(flips) < 10                               # some of each (seed 3)
    for img, t in zip(*e0[0]):
        i = t["image_id"]
        if b.flipped(0, i):
            assert img[0, 0, -1] == 255 and t["boxes"].tolist() == [[6.0, 2.0, 9.0, 6.0]]
        else:
            assert img[0, 0, 0] == 255 and t["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]]
    ranks = [DetectionBatches(_Items(), 4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    whole = _ids(next(DetectionBatches(_Items(), 4, seed=3).epoch(5)))
    parts = [_ids(next(r.epoch(5))) for r in ranks]
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]
    plain = DetectionBatches(_Items(), 4, shuffle=False, drop_last=False)
    assert len(plain) == 3 and [_ids(x) for x in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_batches_bad_arguments():
    with pytest.raises(ValueError, match="10 images make no batch of 16"):
        DetectionBatches(_Items(), 16)
    with pytest.raises(ValueError, match="global batch of 3 does not split over 2"):
        DetectionBatches(_Items(), 3, world_size=2)
    with pytest.raises(ValueError, match="start_batch 3 outside 0..2"):
        next(DetectionBatches(_Items(), 4).epoch(0, 3))


def test_hflip_empty_targets():
    img, t = hflip(torch.zeros(3, 4, 6, dtype=torch.uint8), {"boxes": torch.zeros(0, 4)})
    assert t["boxes"].shape == (0, 4)


@pytest.mark.skipif(not COCO_TAR.is_file(), reason=f"real data {COCO_TAR} not present")
def test_real_coco_subset_end_to_end(tmp_path):
    with tarfile.open(COCO_TAR) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(
            ("coco-subset/annotations/instances_val2017", "coco-subset/images/val2017"))]
        tar.extractall(tmp_path, members=members, filter="data")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no degenerate box in the subset
        ds = CocoDetection(tmp_path / "coco-subset", "val2017")
    assert len(ds) == 204 and ds.num_classes == 80
    assert ds.categories[0] == (1, 1, "person") and ds.categories[-1] == (80, 90, "toothbrush")
    gt = ds.coco_gt()
    assert len(gt["annotations"]) == 1498 and sum(a["iscrowd"] for a in gt["annotations"]) == 5
    img, t = ds[0]
    assert img.shape == (3, 426, 640) and t["image_id"] == 139 and t["labels"].max() <= 80
    assert sum(len(ds.target(i)["boxes"]) for i in range(len(ds))) == 1493
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 1.0} for a in gt["annotations"] if not a["iscrowd"]]
    official = tmp_path / "coco-subset" / "annotations" / "instances_val2017.json"
    assert coco_evaluate(official, res) == pytest.approx(
        {k: 100.0 for k in ("AP", "AP50", "AP75", "APS", "APM", "APL")})
    images, targets = next(DetectionBatches(ds, 2, flip=True).epoch(0))
    assert len(images) == 2 and all(im.shape[0] == 3 for im in images)
