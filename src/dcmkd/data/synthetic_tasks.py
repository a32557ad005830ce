"""Tiny synthetic datasets of the face and detection tasks, written to disk in their standard
layouts, so that a smoke run (``dcmkd reproduce sskd-table7/8/9 --scale smoke``) needs no data:

- :func:`write_identity_folder`: one folder per identity (``id00/0.png`` …) and a
  ``SPLIT_SUGGESTED.csv`` (``identity_dir,celeba_identity,n_images,split``) with an
  identity-disjoint ``train``/``test`` split, the layout :func:`dcmkd.data.faces.read_split_csv`
  reads. An identity's images are one fixed random pattern plus pixel noise (learnable, and
  open-set: test identities are never trained on).
- :func:`write_coco_folder`: ``annotations/instances_<split>.json`` + ``images/<split>/*.png``
  (the COCO layout of :class:`dcmkd.data.detection.CocoDetection`): coloured squares on a dark
  background, each image holding objects of COCO's three size ranges in turn (small < 32²,
  medium, large > 96² pixels of area, when the image is large enough), so every COCO metric
  (APS, APM, APL) is defined.

Both are deterministic (``seed``): the same call writes the same files, so a run's data identity
(``data.json``) is the same on a second call; a folder that already holds a completed dataset
(its marker file) is left as it is. Nothing here says anything about accuracy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

#: written last: a folder holding it is complete (an interrupted write is redone)
MARKER = ".dcmkd_synthetic"


def _done(root: Path, spec: dict) -> bool:
    marker = root / MARKER
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


def write_identity_folder(root: str | os.PathLike, *, train_identities: int = 4,
                          test_identities: int = 10, per_identity: int = 4,
                          test_per_identity: int = 5, size: int = 32, seed: int = 0) -> Path:
    """An identity folder with ``train_identities`` training and ``test_identities`` unseen test
    identities (``per_identity`` / ``test_per_identity`` images each, ``size``² RGB PNGs).

    The defaults give 16 training images (two batches of 8) and 50 test images: 1,125 impostor
    pairs, enough to measure TAR at FAR = 0.1% (one over the impostor pairs must not exceed the
    FAR), and 100 genuine pairs."""
    from PIL import Image

    root = Path(root)
    spec = {"kind": "faces", "train": train_identities, "test": test_identities,
            "per": per_identity, "test_per": test_per_identity, "size": size, "seed": seed}
    if _done(root, spec):
        return root
    if train_identities < 2 or test_identities < 2 or per_identity < 1 or test_per_identity < 2:
        raise ValueError("write_identity_folder needs ≥ 2 identities per side and ≥ 2 images "
                         "per test identity (a genuine pair)")
    rng = np.random.default_rng(seed)
    rows = ["identity_dir,celeba_identity,n_images,split"]
    for k in range(train_identities + test_identities):
        test = k >= train_identities
        count = test_per_identity if test else per_identity
        base = rng.integers(0, 256, (size, size, 3))
        folder = root / f"id{k:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(count):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{j}.png")
        rows.append(f"id{k:03d},{k},{count},{'test' if test else 'train'}")
    (root / "SPLIT_SUGGESTED.csv").write_text("\n".join(rows) + "\n")
    (root / MARKER).write_text(json.dumps(spec))
    return root


#: (name, RGB) of the synthetic COCO categories; ids 3 and 7 (not contiguous, as COCO's)
COCO_CATEGORIES = ((3, "red", (230, 60, 60)), (7, "green", (60, 230, 60)))


def write_coco_folder(root: str | os.PathLike, *, train_images: int = 4, val_images: int = 4,
                      size: int = 128, seed: int = 0,
                      splits: tuple[str, str] = ("train2017", "val2017")) -> Path:
    """A COCO-layout folder: ``train_images`` / ``val_images`` ``size``² images of the splits
    ``splits``, each with one object of each size range that fits (small 12–28 px sides;
    medium 40–80 px; large 100 px or more, only when ``size`` ≥ 104), alternately of two
    categories (ids 3 and 7)."""
    from PIL import Image

    root = Path(root)
    spec = {"kind": "coco", "train": train_images, "val": val_images, "size": size,
            "seed": seed, "splits": list(splits)}
    if _done(root, spec):
        return root
    if size < 48:
        raise ValueError(f"write_coco_folder needs images of at least 48 px, got {size}")
    rng = np.random.default_rng(seed)
    ranges = [(12, 28), (40, min(80, size - 8))] + ([(100, size - 4)] if size >= 104 else [])
    for split, count in zip(splits, (train_images, val_images)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            pixels = np.full((size, size, 3), 20, np.uint8)
            for j, (lo, hi) in enumerate(reversed(ranges)):   # the largest first, under the others
                w = int(rng.integers(lo, hi + 1))
                x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - w + 1))
                cat_id, _, colour = COCO_CATEGORIES[(i + j) % len(COCO_CATEGORIES)]
                pixels[y:y + w, x:x + w] = colour
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": cat_id, "bbox": [x, y, w, w],
                                    "area": w * w, "iscrowd": 0})
            Image.fromarray(pixels).save(root / "images" / split / f"{i:03d}.png")
            images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": size,
                           "height": size})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n, _ in COCO_CATEGORIES]}))
    (root / MARKER).write_text(json.dumps(spec))
    return root


__all__ = ["write_identity_folder", "write_coco_folder", "COCO_CATEGORIES"]
