"""Object-detection datasets (COCO and Pascal VOC layouts) and their resumable batches.

An item is ``(image, target)``: ``image`` a uint8 ``[3,H,W]`` tensor (decoded lazily, RGB),
``target`` the dict torchvision's detectors train on: ``boxes`` float32 ``[N,4]`` (x1, y1, x2, y2
in pixels), ``labels`` int64 ``[N]`` in 1..K (0 is the background, torchvision's convention),
``image_id`` (int), ``area`` float32 ``[N]`` and ``iscrowd`` int64 ``[N]``. ``coco_gt()`` gives
the same images' ground truth in COCO format for :func:`dcmkd.metrics.coco.coco_evaluate`, in
the items' coordinates (resized ones when ``min_size``/``max_size`` are given).

Decisions (the SSKD paper and issue 27 leave them open):

- Labels are contiguous (``1..K`` in ascending COCO category id, so the 80 COCO classes are
  1..80), not torchvision's raw ids 1..90 with holes; ``label_to_category`` maps them back for
  the results JSON.
- COCO crowd annotations (``iscrowd=1``) are left out of the training targets, as Detectron and
  torchvision's references do, and kept in ``coco_gt()``, where pycocotools uses them to ignore
  detections on crowd regions.
- Validation when loading, one line naming the file and the annotation id each:
  a box reaching more than 1 px outside its image is an error; up to 1 px is rounding and is
  clipped. A box of zero width or height (full COCO train2017 holds a few; the coco-subset holds
  none) is dropped with one warning per file, because refusing it would refuse the official
  data; a negative width or height is an error (not a box). An image without boxes is kept (a
  negative image: a target with zero boxes is valid for torchvision), and a dataset that holds
  such images says how many in one warning when it is built (crowd or ``difficult`` objects
  alone count as none: they are no training boxes). An unknown category id or
  class name, a missing image file, malformed JSON/XML and a missing key are errors.
- Resizing (optional) follows torchvision's ``GeneralizedRCNNTransform`` rule: one scale factor
  ``min(min_size / short side, max_size / long side)`` (whichever is given), aspect ratio kept,
  boxes and areas scaled with the image. torchvision's detectors resize internally anyway; this
  option is for decoding large images once (with ``cache=True``) at the size the model uses.
- Pascal VOC boxes are 1-based inclusive pixel indices; they are shifted to continuous
  coordinates ``(xmin - 1, ymin - 1, xmax, ymax)`` as Detectron2's VOC loader does. ``difficult``
  objects are excluded from the training targets by default (the original Faster R-CNN's VOC
  setting; ``keep_difficult=True`` keeps them, Detectron2's choice) and are marked ``iscrowd=1``
  in ``coco_gt()`` so that detections on them are ignored rather than counted false positives,
  as the VOC devkit ignores them. This approximates the devkit: pycocotools matches a crowd
  region by intersection over the detection's area, not IoU, and lets it absorb several
  detections. VOC images get integer ids from their digits (``2008_000123`` -> 2008000123) when
  those are unique, else their 1-based position in the image set.
"""
from __future__ import annotations

import json
import math
import os
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dcmkd.data.loader import derive_seed

#: Pascal VOC's 20 classes, in the devkit's order (labels 1..20)
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

#: how far (pixels) a box may reach outside its image and be clipped rather than refused
BOX_TOLERANCE = 1.0

Target = dict[str, Any]


@dataclass
class _Image:
    """One image and all its annotations (crowd/difficult included), in original pixels."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]   # xyxy, clipped
    labels: list[int]
    areas: list[float]
    crowd: list[int]
    ann_ids: list[int]


def _check_box(x1: float, y1: float, x2: float, y2: float, width: int, height: int,
               where: str) -> tuple[float, float, float, float] | None:
    """The box clipped to the image, None when degenerate (zero width or height); raises for a
    negative size or a box more than ``BOX_TOLERANCE`` px outside the image."""
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"{where}: box {[x1, y1, x2, y2]} is not finite")
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{where}: box (x1, y1, x2, y2) = {[x1, y1, x2, y2]} has a negative "
                         "width or height")
    t = BOX_TOLERANCE
    if x1 < -t or y1 < -t or x2 > width + t or y2 > height + t:
        raise ValueError(f"{where}: box (x1, y1, x2, y2) = {[x1, y1, x2, y2]} lies outside the "
                         f"{width}x{height} image (more than {t:g} px)")
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def _decode(path: Path) -> torch.Tensor:
    """An RGB uint8 ``[3,H,W]`` tensor (Pillow: torchvision's decoders are deprecated)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: {str(e).splitlines()[0]}") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class _DetectionDataset(Dataset):
    """Items, resizing, caching and ``coco_gt`` shared by the COCO and VOC readers."""

    images: list[_Image]
    categories: list[tuple[int, int, str]]   # (contiguous label, category id, name)

    def _setup(self, source: Path, min_size: int | None, max_size: int | None,
               cache: bool) -> None:
        """Options, label maps and the negatives' count of a split read from ``source``."""
        for name, v in (("min_size", min_size), ("max_size", max_size)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {v}")
        self.min_size, self.max_size, self.cache = min_size, max_size, cache
        self._cache: dict[int, torch.Tensor] = {}
        self.label_to_category = {lab: cat for lab, cat, _ in self.categories}
        self.category_to_label = {cat: lab for lab, cat, _ in self.categories}
        self._gt: dict | None = None
        self._count_negatives(source)

    def _count_negatives(self, source: Path) -> None:
        """One warning counting the images without a training box (kept as negatives)."""
        empty = [rec for rec in self.images if all(rec.crowd)]   # all([]) is True: no object
        if empty:
            ignored = sum(1 for rec in empty if rec.crowd)
            note = f"; {ignored} with crowd/difficult objects only" if ignored else ""
            warnings.warn(f"{source}: {len(empty)} of {len(self.images)} images have no "
                          f"boxes (kept as negatives{note})", stacklevel=4)

    @property
    def num_classes(self) -> int:
        """Object classes K (a torchvision detector takes ``num_classes = K + 1``)."""
        return len(self.categories)

    def __len__(self) -> int:
        return len(self.images)

    def size(self, index: int) -> tuple[int, int]:
        """``(height, width)`` of item ``index`` as returned (after the optional resize)."""
        rec = self.images[index]
        s = self._scale(rec)
        return (rec.height, rec.width) if s == 1.0 else \
            (round(rec.height * s), round(rec.width * s))

    def _scale(self, rec: _Image) -> float:
        s = 1.0
        if self.min_size is not None or self.max_size is not None:
            s = math.inf
            if self.min_size is not None:
                s = min(s, self.min_size / min(rec.width, rec.height))
            if self.max_size is not None:
                s = min(s, self.max_size / max(rec.width, rec.height))
        return s

    def _factors(self, index: int) -> tuple[float, float]:
        rec = self.images[index]
        h, w = self.size(index)
        return w / rec.width, h / rec.height

    def image(self, index: int) -> torch.Tensor:
        """The decoded (and resized) uint8 ``[3,H,W]`` image of item ``index``."""
        if index in self._cache:
            return self._cache[index]
        rec = self.images[index]
        img = _decode(rec.path)
        if tuple(img.shape[1:]) != (rec.height, rec.width):
            raise ValueError(f"image {rec.path} is {img.shape[2]}x{img.shape[1]} but its "
                             f"annotation says {rec.width}x{rec.height}")
        h, w = self.size(index)
        if (h, w) != (rec.height, rec.width):
            from torchvision.transforms.v2.functional import resize
            img = resize(img, [h, w], antialias=True)
        if self.cache:
            self._cache[index] = img
        return img

    def target(self, index: int) -> Target:
        """The training target of item ``index`` (crowd/difficult objects left out)."""
        rec = self.images[index]
        fx, fy = self._factors(index)
        keep = [j for j, c in enumerate(rec.crowd) if not c]
        boxes = torch.tensor([rec.boxes[j] for j in keep], dtype=torch.float64).reshape(-1, 4)
        boxes = (boxes * torch.tensor([fx, fy, fx, fy], dtype=torch.float64)).float()
        return {"boxes": boxes,
                "labels": torch.tensor([rec.labels[j] for j in keep], dtype=torch.int64),
                "image_id": rec.image_id,
                "area": torch.tensor([rec.areas[j] * fx * fy for j in keep], dtype=torch.float32),
                "iscrowd": torch.zeros(len(keep), dtype=torch.int64)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} outside 0..{len(self) - 1}")
        index %= len(self)
        return self.image(index), self.target(index)

    def coco_gt(self) -> dict:
        """The ground truth of these images in COCO format (all annotations, crowd and VOC
        difficult ones with ``iscrowd=1``), in the items' coordinates."""
        if self._gt is None:
            images, anns = [], []
            for i, rec in enumerate(self.images):
                h, w = self.size(i)
                fx, fy = self._factors(i)
                images.append({"id": rec.image_id, "width": w, "height": h,
                               "file_name": rec.path.name})
                for (x1, y1, x2, y2), lab, area, crowd, aid in zip(
                        rec.boxes, rec.labels, rec.areas, rec.crowd, rec.ann_ids):
                    anns.append({"id": aid, "image_id": rec.image_id,
                                 "category_id": self.label_to_category[lab],
                                 "bbox": [x1 * fx, y1 * fy, (x2 - x1) * fx, (y2 - y1) * fy],
                                 "area": area * fx * fy, "iscrowd": int(crowd)})
            self._gt = {"images": images, "annotations": anns,
                        "categories": [{"id": c, "name": n} for _, c, n in self.categories]}
        return self._gt


def _require(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where} has no '{key}'")
    return d[key]


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where} is {v!r}, expected a number")
    return float(v)


class CocoDetection(_DetectionDataset):
    """A COCO-layout detection split: ``root/annotations/instances_<split>.json`` with images in
    ``root/images/<split>/`` or (the official layout) ``root/<split>/``.

    ``categories``: ``(label, COCO category id, name)`` per class, labels 1..K in ascending id.
    ``cache=True`` keeps decoded images in memory (returned shared: do not modify them in place;
    a detector wants ``image.float() / 255``, a new tensor). See the module docstring for
    validation.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train2017", *,
                 min_size: int | None = None, max_size: int | None = None, cache: bool = False):
        self.root, self.split = Path(root).expanduser(), split
        self.ann_file = self.root / "annotations" / f"instances_{split}.json"
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.ann_file} does not exist "
                                    f"(expected root/annotations/instances_{split}.json)")
        for folder in (self.root / "images" / split, self.root / split):
            if folder.is_dir():
                self.image_dir = folder
                break
        else:
            raise FileNotFoundError(f"no image folder for {split}: expected "
                                    f"{self.root / 'images' / split} or {self.root / split}")
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file} is not valid JSON: {e}") from None
        self._parse(data)
        self._setup(self.ann_file, min_size, max_size, cache)

    def _parse(self, data: Any) -> None:
        name = self.ann_file.name
        for key in ("images", "annotations", "categories"):
            if not isinstance(_require(data, key, name), list):
                raise ValueError(f"{name}: '{key}' is not a list")
        cats = []
        for k, c in enumerate(data["categories"]):
            cats.append((int(_require(c, "id", f"{name}: category #{k}")),
                         str(_require(c, "name", f"{name}: category #{k}"))))
        if len({c for c, _ in cats}) != len(cats):
            raise ValueError(f"{name}: category ids are not unique")
        self.categories = [(lab, c, n) for lab, (c, n) in enumerate(sorted(cats), start=1)]
        label_of = {c: lab for lab, c, _ in self.categories}

        by_id: dict[int, _Image] = {}
        for k, im in enumerate(data["images"]):
            where = f"{name}: image #{k}"
            iid = int(_require(im, "id", where))
            where = f"{name}: image id {iid}"
            if iid in by_id:
                raise ValueError(f"{where} appears twice")
            path = self.image_dir / str(_require(im, "file_name", where))
            w, h = (int(_number(_require(im, key, where), f"{where} '{key}'"))
                    for key in ("width", "height"))
            if w < 1 or h < 1:
                raise ValueError(f"{where}: size {w}x{h} is not positive")
            if not path.is_file():
                raise FileNotFoundError(f"{where}: image file {path} does not exist")
            by_id[iid] = _Image(iid, path, w, h, [], [], [], [], [])

        dropped: list[int] = []
        for k, a in enumerate(data["annotations"]):
            aid = int(_require(a, "id", f"{name}: annotation #{k}"))
            where = f"{name}: annotation id {aid}"
            iid = _require(a, "image_id", where)
            if iid not in by_id:
                raise ValueError(f"{where}: image_id {iid} is not among the images")
            cat = _require(a, "category_id", where)
            if cat not in label_of:
                raise ValueError(f"{where}: unknown category_id {cat} (not in 'categories')")
            bbox = _require(a, "bbox", where)
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
            x, y, w, h = (_number(v, f"{where} bbox value") for v in bbox)
            rec = by_id[iid]
            box = _check_box(x, y, x + w, y + h, rec.width, rec.height,
                             f"{where} (image {rec.path.name})")
            if box is None:
                dropped.append(aid)
                continue
            area = a.get("area")
            area = w * h if area is None else _number(area, f"{where} area")
            rec.boxes.append(box)
            rec.labels.append(label_of[cat])
            rec.areas.append(area)
            rec.crowd.append(int(bool(a.get("iscrowd", 0))))
            rec.ann_ids.append(aid)
        if dropped:
            more = " ..." if len(dropped) > 5 else ""
            warnings.warn(f"{self.ann_file}: dropped {len(dropped)} box(es) of zero width or "
                          f"height (annotation ids {dropped[:5]}{more})", stacklevel=3)
        self.images = [by_id[i] for i in sorted(by_id)]


def _xml_text(node: ET.Element, key: str, where: str) -> str:
    child = node.find(key)
    if child is None or child.text is None or not child.text.strip():
        raise ValueError(f"{where} has no <{key}>")
    return child.text.strip()


def _xml_number(node: ET.Element, key: str, where: str) -> float:
    text = _xml_text(node, key, where)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: <{key}> is {text!r}, expected a number") from None


class VocDetection(_DetectionDataset):
    """A Pascal VOC-layout split: ``root/ImageSets/Main/<image_set>.txt`` listing ids, with
    ``root/Annotations/<id>.xml`` and ``root/JPEGImages/<id>.jpg`` (``root`` is e.g.
    ``VOCdevkit/VOC2007``). Labels are 1 + the class's position in ``classes``, which are also the
    COCO category ids of ``coco_gt()``. See the module docstring for ``difficult`` objects."""

    def __init__(self, root: str | os.PathLike, image_set: str = "trainval",
                 classes: Sequence[str] = VOC_CLASSES, *, keep_difficult: bool = False,
                 min_size: int | None = None, max_size: int | None = None, cache: bool = False):
        self.root, self.image_set = Path(root).expanduser(), image_set
        self.keep_difficult = keep_difficult
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"VOC classes must be distinct names, got {list(classes)}")
        self.categories = [(i, i, str(c)) for i, c in enumerate(classes, start=1)]
        label_of = {c: i for i, _, c in self.categories}
        list_file = self.root / "ImageSets" / "Main" / f"{image_set}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(f"VOC image-set list {list_file} does not exist "
                                    f"(expected root/ImageSets/Main/{image_set}.txt)")
        ids = [ln.split()[0] for ln in list_file.read_text().splitlines() if ln.strip()]
        if not ids:
            raise ValueError(f"VOC image-set list {list_file} names no image")
        digits = [i.replace("_", "") for i in ids]
        numeric = all(d.isdigit() for d in digits) and len(set(map(int, digits))) == len(ids)
        self.images = []
        for pos, name in enumerate(ids, start=1):
            iid = int(name.replace("_", "")) if numeric else pos
            self.images.append(self._parse(name, iid, label_of))
        self._setup(list_file, min_size, max_size, cache)

    def _parse(self, name: str, iid: int, label_of: dict[str, int]) -> _Image:
        xml_path = self.root / "Annotations" / f"{name}.xml"
        if not xml_path.is_file():
            raise FileNotFoundError(f"VOC annotation {xml_path} does not exist")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            raise ValueError(f"{xml_path} is not valid XML: {e}") from None
        size = tree.find("size")
        if size is None:
            raise ValueError(f"{xml_path} has no <size>")
        w = int(_xml_number(size, "width", f"{xml_path} <size>"))
        h = int(_xml_number(size, "height", f"{xml_path} <size>"))
        if w < 1 or h < 1:
            raise ValueError(f"{xml_path}: size {w}x{h} is not positive")
        file_name = tree.findtext("filename") or f"{name}.jpg"
        path = self.root / "JPEGImages" / file_name.strip()
        if not path.is_file():
            path = self.root / "JPEGImages" / f"{name}.jpg"
        if not path.is_file():
            raise FileNotFoundError(f"{xml_path}: image file {path} does not exist")
        rec = _Image(iid, path, w, h, [], [], [], [], [])
        for k, obj in enumerate(tree.findall("object")):
            where = f"{xml_path} object #{k}"
            cls = _xml_text(obj, "name", where)
            if cls not in label_of:
                raise ValueError(f"{where}: unknown class '{cls}' (not among the "
                                 f"{len(label_of)} classes)")
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"{where} has no <bndbox>")
            x1, y1, x2, y2 = (_xml_number(bb, key, f"{where} <bndbox>")
                              for key in ("xmin", "ymin", "xmax", "ymax"))
            box = _check_box(x1 - 1, y1 - 1, x2, y2, w, h, where)
            if box is None:
                warnings.warn(f"{where}: dropped a box of zero width or height", stacklevel=4)
                continue
            difficult = obj.findtext("difficult", "0").strip() == "1"
            rec.boxes.append(box)
            rec.labels.append(label_of[cls])
            rec.areas.append((box[2] - box[0]) * (box[3] - box[1]))
            rec.crowd.append(int(difficult and not self.keep_difficult))
            rec.ann_ids.append(iid * 1000 + k + 1)   # unique per image (VOC has < 1000 objects)
        return rec


def hflip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror an image and its boxes left-right: ``x1' = W - x2``, ``x2' = W - x1``."""
    width = image.shape[-1]
    boxes = target["boxes"]
    flipped = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                          dim=1) if len(boxes) else boxes.clone()
    return image.flip(-1), {**target, "boxes": flipped}


class DetectionBatches:
    """A detection dataset as the loop's :class:`~dcmkd.data.batches.Batches`: ``len(self)``
    batches per epoch, ``epoch(e, start_batch)`` yielding ``(list of uint8 [3,H,W] images,
    list of target dicts)``.

    The order of epoch ``e`` is a permutation drawn from ``derive_seed(seed, e)`` (or the stored
    order without ``shuffle``); with ``flip`` an item is mirrored when bit 0 of
    ``derive_seed(seed, e, index, 2)`` is set, so a resumed epoch replays exactly. ``batch_size``
    is the global batch: with ``world_size > 1`` every rank walks the same global batches and
    takes rows ``rank::world_size`` of each (as :mod:`dcmkd.data.loader` does).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True, flip: bool = False,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if batch_size % world_size:
            raise ValueError(f"the global batch of {batch_size} does not split over {world_size} "
                             f"processes: use a multiple of {world_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, int(seed)
        self.shuffle, self.drop_last, self.flip = shuffle, drop_last, flip
        self.rank, self.world_size = rank, world_size
        self.num_samples = len(dataset)
        if world_size > 1 and not drop_last and self.num_samples % batch_size:
            raise ValueError(f"drop_last=False over {world_size} processes: the last partial "
                             "batch would split unevenly (some ranks empty); keep drop_last")
        if len(self) == 0:
            raise ValueError(f"{self.num_samples} images make no batch of {batch_size} "
                             "(drop_last): use a smaller batch")

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def order(self, epoch: int) -> list[int]:
        """The dataset indices of ``epoch`` in the order the global batches take them."""
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def flipped(self, epoch: int, index: int) -> bool:
        """Whether item ``index`` is mirrored in ``epoch``."""
        return self.flip and bool(derive_seed(self.seed, epoch, index, 2) & 1)

    def epoch(self, epoch: int, start_batch: int = 0
              ) -> Iterator[tuple[list[torch.Tensor], list[Target]]]:
        """Batches ``start_batch, …, len(self)-1`` of ``epoch`` (this rank's rows)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        order = self.order(epoch)
        for b in range(start_batch, len(self)):
            rows = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world_size]
            images, targets = [], []
            for i in rows:
                image, target = self.dataset[i]
                if self.flipped(epoch, i):
                    image, target = hflip(image, target)
                images.append(image)
                targets.append(target)
            yield images, targets

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], list[Target]]]:
        """One pass in epoch 0's order."""
        return self.epoch(0)


__all__ = ["VOC_CLASSES", "BOX_TOLERANCE", "CocoDetection", "VocDetection", "DetectionBatches",
           "hflip"]
