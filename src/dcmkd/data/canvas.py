"""Canvases: a detection dataset made of real object images pasted at known places and sizes.

Issue 27 asks for a detection comparison (teacher / student / SSKD, FPN and RetinaNet, the SSKD
paper's Tables 8-9) in which learning can happen on 2 CPU cores. COCO itself cannot be learnt here
without pretrained backbones, so this builds a small COCO-layout dataset from real images (e.g.
the real CIFAR-10 photographs): each canvas holds 1..k object images, each rescaled to a drawn
size and pasted at a drawn place, its box exactly the pasted rectangle, its category the source
class. It is read by :class:`dcmkd.data.detection.CocoDetection` and scored by pycocotools like
COCO.

Choices (none comes from a paper; all are parameters):

- Sizes: every object first draws a COCO size range (small: area < 32², medium: 32²..96², large:
  > 96², the COCO detection evaluation's ranges) with probabilities ``size_mix`` (default 0.4, 0.4,
  0.2), then a log-uniform side within it (small 10..30 px, medium 34..92 px, large 100 px ..
  90 % of the canvas) and an aspect ratio log-uniform in [3/4, 4/3]; a draw whose area falls
  outside its range after rounding is redrawn, so no object sits on a range boundary.
  ``summary`` reports the counts per range actually written.
- Placement: objects are placed from the largest to the smallest at uniform positions; a
  position is refused when it covers more than ``max_overlap`` (default 0.1) of either box's
  area by another object's box; after 50 refusals the object is left out (counted as
  ``dropped``). Later (smaller) objects are pasted over earlier ones, so at least
  ``1 - max_overlap`` of every object is visible and its box is the full pasted rectangle.
- Background (``background``): ``"blur"`` (default), a random 8×8 patch of a real image of the
  same split rescaled to the canvas and blurred (Gaussian, radius canvas/32), so the background
  has natural colours and gradients but no recognisable (unlabelled) object: a whole source
  image rescaled and blurred kept its object visible, which the detector would be penalised for
  finding; ``"noise"``, uniform RGB noise; ``"plain"``, mid grey (114, the letterbox grey of
  YOLO-style loaders).
- Splits: ``source/train`` makes the ``train`` canvases and ``source/test`` (or ``val``) the
  ``val`` canvases, so no object image appears in both; a source without those folders is one
  image folder whose images are split per class (disjointly, ``n_val / (n_train + n_val)`` of
  each class to ``val``). The layout written is ``out/images/{train,val}/NNNNNN.png`` and
  ``out/annotations/instances_{train,val}.json``, categories = the source classes (ids 1..K in
  sorted class order).
- Determinism and atomicity: canvas ``i`` of a split is drawn from ``derive_seed(seed, split,
  i)``; every file is written under a temporary name and renamed; the annotation files come
  last, so an interrupted run leaves no readable dataset. A folder already holding canvases made
  with the same parameters is reused (``summary["reused"]``); one made otherwise is refused.

What it cannot show: the objects are pasted, so context, occlusion, clutter and the objects'
own shapes (every box is a filled rectangle) are unlike COCO; upscaled 32×32 images make large
objects blurry; AP on canvases measures how well a detector finds and classifies pasted
objects by size, not COCO performance.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dcmkd.data.folder import _iter_images, class_folders, scan_folder
from dcmkd.data.loader import derive_seed

#: the two splits written, in this order
CANVAS_SPLITS = ("train", "val")
#: the COCO size ranges (upper area bounds), the evaluation's ``areaRng``
SIZE_RANGES = ("small", "medium", "large")
_SMALL, _LARGE = 32 ** 2, 96 ** 2
#: the side ranges (pixels, square root of the area) drawn per size range
_SIDES = {"small": (10.0, 30.0), "medium": (34.0, 92.0), "large": (100.0, None)}
_ASPECT = (3 / 4, 4 / 3)
_PLACE_TRIES = 50
_PATCH = 8           # background: the side (px) of the source patch rescaled to the canvas
_BLUR_DIVISOR = 32   # background: Gaussian blur radius = canvas / this
_GREY = 114
_FORMAT = 1   # bumped when the canvases drawn for given parameters change


def size_range(area: float) -> str:
    """The COCO size range of an area (pixels²)."""
    return "small" if area < _SMALL else "medium" if area <= _LARGE else "large"


def _sources(source: Path, n_train: int, n_val: int, seed: int
             ) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]]:
    """The classes and, per split, the (paths, class indices) its objects are drawn from."""
    if not source.is_dir():
        raise FileNotFoundError(f"canvas source {source} does not exist (expected an image "
                                "folder: <class>/<image>, or train/ and test/ holding such)")
    if (source / "train").is_dir():
        tr_paths, tr_labels, classes = scan_folder(source, "train")
        va_paths, va_labels, va_classes = scan_folder(source, "test")
        return classes, {"train": (tr_paths, tr_labels), "val": (va_paths, va_labels)}
    classes = class_folders(source)
    if not classes:
        raise FileNotFoundError(f"canvas source {source} holds no class sub-folders "
                                "(expected <class>/<image> files, or train/ and test/)")
    rng = np.random.default_rng(derive_seed(seed, 7))
    split: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "val": ([], [])}
    for k, cls in enumerate(classes):
        files = list(_iter_images(source / cls))
        if len(files) < 2:
            raise ValueError(f"class folder {source / cls} holds {len(files)} image(s): at least "
                             "2 are needed so that train and val canvases use different images")
        files = [files[j] for j in rng.permutation(len(files))]
        n = min(len(files) - 1, max(1, round(len(files) * n_val / (n_train + n_val))))
        for name, part in (("val", files[:n]), ("train", files[n:])):
            split[name][0].extend(part)
            split[name][1].extend([k] * len(part))
    return classes, split


class _Images:
    """Source images, decoded once (RGB PIL images)."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def __call__(self, path: str):
        if path not in self._cache:
            from PIL import Image, UnidentifiedImageError
            try:
                with Image.open(path) as im:
                    self._cache[path] = im.convert("RGB")
            except (OSError, UnidentifiedImageError, ValueError) as e:
                raise ValueError(f"cannot decode source image {path}: "
                                 f"{str(e).splitlines()[0]}") from None
        return self._cache[path]


def _draw_size(rng: np.random.Generator, kind: str, canvas: int) -> tuple[int, int]:
    lo, hi = _SIDES[kind]
    hi = 0.9 * canvas if hi is None else hi
    for _ in range(100):
        side = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        aspect = math.exp(rng.uniform(math.log(_ASPECT[0]), math.log(_ASPECT[1])))
        w, h = round(side * math.sqrt(aspect)), round(side / math.sqrt(aspect))
        if w <= canvas and h <= canvas and size_range(w * h) == kind \
                and w * h not in (_SMALL, _LARGE):
            return w, h
    raise ValueError(f"cannot draw a {kind} object on a {canvas}px canvas")  # pragma: no cover


def _overlap_ok(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]],
                max_overlap: float) -> bool:
    x, y, w, h = box
    for px, py, pw, ph in placed:
        iw = min(x + w, px + pw) - max(x, px)
        ih = min(y + h, py + ph) - max(y, py)
        if iw > 0 and ih > 0 and iw * ih > max_overlap * min(w * h, pw * ph):
            return False
    return True


def _background(rng: np.random.Generator, kind: str, canvas: int, pool: list[str],
                images: _Images):
    from PIL import Image, ImageFilter

    if kind == "plain":
        return Image.new("RGB", (canvas, canvas), (_GREY,) * 3)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (canvas, canvas, 3), dtype=np.uint8))
    src = images(pool[int(rng.integers(len(pool)))])
    p = min(_PATCH, src.width, src.height)
    x, y = int(rng.integers(src.width - p + 1)), int(rng.integers(src.height - p + 1))
    patch = src.crop((x, y, x + p, y + p))
    return patch.resize((canvas, canvas), Image.BILINEAR).filter(
        ImageFilter.GaussianBlur(max(1, canvas // _BLUR_DIVISOR)))


def _canvas(rng: np.random.Generator, paths: list[str], labels: list[int], images: _Images, *,
            canvas: int, objects: tuple[int, int], mix: np.ndarray, background: str,
            max_overlap: float):
    """One canvas: (PIL image, [(x, y, w, h, class index)], objects dropped)."""
    from PIL import Image

    img = _background(rng, background, canvas, paths, images)
    n = int(rng.integers(objects[0], objects[1] + 1))
    kinds = [SIZE_RANGES[int(k)] for k in rng.choice(3, size=n, p=mix)]
    sizes = sorted((_draw_size(rng, k, canvas) for k in kinds), key=lambda s: -s[0] * s[1])
    placed: list[tuple[int, int, int, int]] = []
    boxes, dropped = [], 0
    for w, h in sizes:
        j = int(rng.integers(len(paths)))
        for _ in range(_PLACE_TRIES):
            box = (int(rng.integers(canvas - w + 1)), int(rng.integers(canvas - h + 1)), w, h)
            if _overlap_ok(box, placed, max_overlap):
                break
        else:
            dropped += 1
            continue
        placed.append(box)
        img.paste(images(paths[j]).resize((w, h), Image.BILINEAR), box[:2])
        boxes.append((*box, labels[j]))
    return img, boxes, dropped


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _existing(ann: Path) -> dict | None:
    if not ann.is_file():
        return None
    try:
        return json.loads(ann.read_text()).get("info", {}).get("dcmkd_canvas")
    except (json.JSONDecodeError, AttributeError):
        return None


def make_canvas_dataset(source: str | os.PathLike, out: str | os.PathLike, *, n_train: int,
                        n_val: int, canvas: int = 128, objects: tuple[int, int] = (1, 4),
                        seed: int = 0, size_mix: Sequence[float] = (0.4, 0.4, 0.2),
                        background: str = "blur", max_overlap: float = 0.1) -> dict:
    """Write ``n_train`` train and ``n_val`` val canvases of ``canvas``² pixels, each with
    ``objects[0]..objects[1]`` objects from ``source``, into the COCO-layout folder ``out``.

    Returns the summary: ``out``, ``classes``, the parameters, and per split ``images``,
    ``objects``, ``dropped`` and the object count per size range (``small``/``medium``/
    ``large``); ``reused`` is True when ``out`` already held these canvases.
    """
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be at least 1, got {n_train} and {n_val}")
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1]:
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max, got {objects}")
    mix = np.asarray(size_mix, dtype=np.float64)
    if mix.shape != (3,) or (mix < 0).any() or mix.sum() <= 0:
        raise ValueError(f"size_mix must be 3 non-negative weights (small, medium, large), got "
                         f"{list(size_mix)}")
    mix = mix / mix.sum()
    if canvas < 32:
        raise ValueError(f"canvas must be at least 32 px, got {canvas}")
    if mix[2] > 0 and 0.9 * canvas < _SIDES["large"][0] + 4:
        raise ValueError(f"a {canvas}px canvas cannot hold a large object (area > 96², side up to "
                         "90% of the canvas): use canvas >= 116 or size_mix with large = 0")
    if background not in ("blur", "noise", "plain"):
        raise ValueError(f"background must be 'blur', 'noise' or 'plain', got {background!r}")
    if not 0 <= max_overlap < 1:
        raise ValueError(f"max_overlap must be in [0, 1), got {max_overlap}")

    classes, pools = _sources(source, n_train, n_val, seed)
    params = {"format": _FORMAT, "source": str(source.resolve()), "n_train": n_train,
              "n_val": n_val, "canvas": canvas, "objects": list(objects), "seed": seed,
              "size_mix": [float(m) for m in mix], "background": background,
              "max_overlap": max_overlap,
              "source_images": {s: len(p) for s, (p, _) in pools.items()}}
    anns = {s: out / "annotations" / f"instances_{s}.json" for s in CANVAS_SPLITS}
    found = [_existing(a) for a in anns.values()]
    if all(f is not None for f in found):
        if all(f["params"] == params for f in found):
            return {**found[0]["summary"], "reused": True}
        raise FileExistsError(f"{out} already holds canvases made with other parameters: give "
                              "another folder or delete it")

    images = _Images()
    summary: dict[str, Any] = {"out": str(out), "classes": classes, **params}
    categories = [{"id": k + 1, "name": c, "supercategory": "object"}
                  for k, c in enumerate(classes)]
    records = {}
    for split_code, (split, n) in enumerate(zip(CANVAS_SPLITS, (n_train, n_val))):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        paths, labels = pools[split]
        imgs, ann_list = [], []
        counts = dict.fromkeys(SIZE_RANGES, 0)
        dropped = 0
        for i in range(n):
            rng = np.random.default_rng(derive_seed(seed, split_code, i))
            img, boxes, lost = _canvas(rng, paths, labels, images, canvas=canvas,
                                       objects=tuple(objects), mix=mix, background=background,
                                       max_overlap=max_overlap)
            dropped += lost
            name = f"{i + 1:06d}.png"
            _write_atomic(folder / name, lambda p: img.save(p, format="PNG"))
            imgs.append({"id": i + 1, "file_name": name, "width": canvas, "height": canvas})
            for x, y, w, h, k in boxes:
                counts[size_range(w * h)] += 1
                ann_list.append({"id": len(ann_list) + 1, "image_id": i + 1,
                                 "category_id": k + 1, "bbox": [x, y, w, h], "area": w * h,
                                 "iscrowd": 0,
                                 "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
        summary[split] = {"images": n, "objects": len(ann_list), "dropped": dropped, **counts}
        records[split] = (imgs, ann_list)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, (imgs, ann_list) in records.items():
        data = {"info": {"description": f"dcmkd canvases of {source.name} objects ({split})",
                         "dcmkd_canvas": {"params": params, "summary": summary}},
                "images": imgs, "annotations": ann_list, "categories": categories}
        _write_atomic(anns[split], lambda p: Path(p).write_text(json.dumps(data)))
    return {**summary, "reused": False}


__all__ = ["CANVAS_SPLITS", "SIZE_RANGES", "make_canvas_dataset", "size_range"]
