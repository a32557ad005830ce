"""IJB-A face images for evaluation (the SSKD paper's Table 7 test set): each face sighting of
the protocol cropped from its image or video frame by its box and decoded once into memory.

IJB-A's metadata (:func:`dcmkd.metrics.face.ijba_sightings`) names each face by a FILE relative
to the release's image folder (``img/27.jpg``, ``frame/30000_00001.png``) and a face box
``FACE_X, FACE_Y, FACE_WIDTH, FACE_HEIGHT`` in pixels. **Choice** (the paper says nothing about
its IJB-A preprocessing; faces are not landmark-aligned here, as the training crops of an
identity folder are not): the crop is the square of side ``max(width, height)`` centred on the
box (so the face keeps its aspect ratio, as the near-square training crops do), parts outside
the image black, resized bilinearly to the network's input size. A FILE without a box (metadata
without the box columns) is taken as a face crop already and only resized.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dcmkd.data.faces import _one_line, _pil


def ijba_image_root(protocol_root: str | os.PathLike,
                    images: str | os.PathLike | None = None) -> Path:
    """Where IJB-A's FILE paths are found: ``images`` when given, else the release's
    ``<protocol_root>/images`` when it is a folder, else ``protocol_root`` itself."""
    if images is not None:
        root = Path(images).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"IJB-A image folder {root} does not exist")
        return root
    root = Path(protocol_root).expanduser()
    return root / "images" if (root / "images").is_dir() else root


def square_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    """The crop of a face box (x, y, width, height): the square of side max(width, height)
    centred on it, as (left, top, right, bottom) integer pixels (module note)."""
    x, y, w, h = (float(v) for v in box)
    side = max(w, h)
    cx, cy = x + w / 2, y + h / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    side_px = max(1, int(round(side)))
    return left, top, left + side_px, top + side_px


def load_face(path: Path, box: Sequence[float] | None, size: int) -> np.ndarray:
    """One face as uint8 ``[3, size, size]`` RGB: cropped by :func:`square_box` (outside the
    image black) when ``box`` is given, then resized bilinearly."""
    Image = _pil()
    if not path.is_file():
        raise FileNotFoundError(f"IJB-A image {path} does not exist")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if box is not None:
                im = im.crop(square_box(box))   # Pillow fills outside the image with black
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise
    except Exception as e:  # Pillow raises several types for a broken file
        raise ValueError(f"cannot read IJB-A image {path}: {_one_line(e)}") from None
    return arr.transpose(2, 0, 1)


def load_faces(image_root: Path, faces: Sequence[tuple[str, Sequence[float] | None]],
               size: int, quiet: bool = False) -> torch.Tensor:
    """uint8 ``[N, 3, size, size]``: :func:`load_face` of each ``(FILE, box)`` under
    ``image_root``, in order, with progress (IJB-A has about 26k faces: a bar on a terminal, a
    line per 30 s elsewhere; ``quiet`` off)."""
    from dcmkd.progress import track

    out = np.empty((len(faces), 3, size, size), dtype=np.uint8)
    for i, (file, box) in enumerate(track(faces, what="decoding IJB-A faces", unit="img",
                                          quiet=quiet)):
        out[i] = load_face(image_root / file, box, size)
    return torch.from_numpy(out)


__all__ = ["ijba_image_root", "square_box", "load_face", "load_faces"]
