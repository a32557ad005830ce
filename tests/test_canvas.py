"""Canvas detection datasets (dcmkd.data.canvas): exact boxes, size ranges, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcmkd.data.canvas import make_canvas_dataset, size_range
from dcmkd.data.detection import CocoDetection
from dcmkd.metrics.coco import coco_evaluate

CLASSES = ("blue", "green", "red")
GREY = 114


def _colour(k: int, split: str) -> tuple[int, int, int]:
    """Class k's solid colour: channel 2-k for blue/green/red, 250 in train, 180 in test."""
    c = [0, 0, 0]
    c[2 - k] = 250 if split == "train" else 180
    return tuple(c)


def _source(tmp_path: Path, splits=("train", "test"), per_class: int = 2) -> Path:
    root = tmp_path / "src"
    for split in splits:
        for k, cls in enumerate(CLASSES):
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (8, 8), _colour(k, split or "train")).save(folder / f"{j}.png")
    return root


def _make(tmp_path, src, out="out", **kw):
    args = dict(n_train=24, n_val=6, canvas=120, objects=(1, 3), seed=5, background="plain",
                max_overlap=0.0)
    return make_canvas_dataset(src, tmp_path / out, **{**args, **kw})


def test_boxes_are_exactly_the_pasted_pixels(tmp_path):
    summary = _make(tmp_path, _source(tmp_path))
    out = tmp_path / "out"
    for split, source_split in (("train", "train"), ("val", "test")):
        data = json.loads((out / "annotations" / f"instances_{split}.json").read_text())
        assert [c["name"] for c in data["categories"]] == list(CLASSES)
        counts = dict.fromkeys(("small", "medium", "large"), 0)
        for im in data["images"]:
            px = np.asarray(Image.open(out / "images" / split / im["file_name"]).convert("RGB"))
            covered = np.zeros(px.shape[:2], bool)
            for a in (a for a in data["annotations"] if a["image_id"] == im["id"]):
                x, y, w, h = a["bbox"]
                colour = _colour(a["category_id"] - 1, source_split)
                assert (px[y:y + h, x:x + w] == colour).all()       # the object, whole
                mask = (px == colour).all(-1)
                mask[:y] = mask[y + h:] = False
                mask[:, :x] = mask[:, x + w:] = False
                assert mask.sum() == w * h == a["area"]
                covered[y:y + h, x:x + w] = True
                counts[size_range(w * h)] += 1
            assert (px[~covered] == GREY).all()                      # nothing outside the boxes
        assert {k: summary[split][k] for k in counts} == counts
        assert summary[split]["objects"] == len(data["annotations"])
        assert summary[split]["images"] == len(data["images"])
    # every COCO size range occurs in train (seed 5)
    assert min(summary["train"][k] for k in ("small", "medium", "large")) > 0
    assert summary["reused"] is False


def test_read_by_coco_detection_and_pycocotools(tmp_path):
    _make(tmp_path, _source(tmp_path), background="blur", max_overlap=0.1)
    ds = CocoDetection(tmp_path / "out", "val")
    assert len(ds) == 6 and ds.num_classes == 3
    img, t = ds[0]
    assert img.shape == (3, 120, 120) and len(t["boxes"]) >= 1
    gt = ds.coco_gt()
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "score": 1.0} for a in gt["annotations"]]
    assert coco_evaluate(gt, res)["AP"] == pytest.approx(100.0)


def test_deterministic_reused_and_refused(tmp_path):
    src = _source(tmp_path)
    first = _make(tmp_path, src, "a", background="noise")
    again = _make(tmp_path, src, "b", background="noise")
    other = _make(tmp_path, src, "c", background="noise", seed=6)
    png = "images/train/000003.png"
    assert (tmp_path / "a" / png).read_bytes() == (tmp_path / "b" / png).read_bytes()
    assert (tmp_path / "a" / png).read_bytes() != (tmp_path / "c" / png).read_bytes()
    assert first["train"] == again["train"]
    reused = _make(tmp_path, src, "a", background="noise")
    assert reused["reused"] is True and reused["train"] == first["train"]
    with pytest.raises(FileExistsError, match="already holds canvases made with other param"):
        _make(tmp_path, src, "a", background="noise", n_val=7)
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_one_folder_source_splits_images_per_class(tmp_path):
    src = _source(tmp_path, splits=("",), per_class=4)
    summary = _make(tmp_path, src, n_train=3, n_val=3, size_mix=(1, 0, 0))
    assert summary["source_images"] == {"train": 6, "val": 6}    # 2 + 2 of each class
    assert summary["train"]["medium"] == summary["train"]["large"] == 0


@pytest.mark.parametrize("kw, error, match", [
    ({"source": "missing"}, FileNotFoundError, "canvas source .*missing does not exist"),
    ({"source": "empty"}, FileNotFoundError, "canvas source .*empty holds no class sub-folders"),
    ({"source": "single"}, ValueError, r"class folder .*blue holds 1 image\(s\): at least 2"),
    ({"canvas": 100}, ValueError, "a 100px canvas cannot hold a large object"),
    ({"size_mix": (1, 1)}, ValueError, "size_mix must be 3 non-negative weights"),
    ({"objects": (3, 1)}, ValueError, r"objects must be \(min, max\)"),
    ({"background": "sky"}, ValueError, "background must be 'blur', 'noise' or 'plain'"),
])
def test_bad_input_one_line(tmp_path, kw, error, match):
    src = _source(tmp_path)
    (tmp_path / "empty").mkdir()
    single = _source(tmp_path / "s", splits=("",), per_class=1)
    sources = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "single": single}
    if "source" in kw:
        src = sources[kw.pop("source")]
    with pytest.raises(error, match=match) as e:
        _make(tmp_path, src, **kw)
    assert "\n" not in str(e.value)
