"""Face data: identity folders, open-set identity splits and LFW-style pair files.

An identity-folder dataset is ``root/<identity>/<image files>``: one folder per person, images
directly inside it. Face recognition is evaluated *open-set* (the SSKD paper, Table 7: trained on
CASIA-WebFace, tested on IJB-A, whose people are never seen in training), so the split is over
identities, never over the images of one identity.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

#: image file endings read from an identity folder (case-insensitive)
FACE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm")
#: the values of the ``split`` column of a split CSV
SPLITS = ("train", "test")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("face folders need Pillow: pip install 'dcmkd[train]'") from e
    return Image


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ----------------------------------------------------------------------------- identity folders

def identity_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the (non-hidden) identity folders under ``root``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"face folder {root} does not exist "
                                "(expected root/<identity>/<image files>)")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"no identity folder in {root}: expected one sub-folder of images "
                         "per person (root/<identity>/<image files>)")
    return names


def identity_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    files = sorted(e.name for e in os.scandir(folder)
                   if e.is_file() and not e.name.startswith(".")
                   and e.name.lower().endswith(FACE_EXTENSIONS))
    if not files:
        raise ValueError(f"identity folder {folder} holds no image "
                         f"({'/'.join(x[1:] for x in FACE_EXTENSIONS)})")
    return [folder / f for f in files]


def decode_face(path: Path, size: int) -> np.ndarray:
    """One image as uint8 ``[3, size, size]`` RGB (greyscale and palette images converted),
    resized with bilinear interpolation (aspect ratio not kept: face crops are near square)."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises several types for a broken file
        raise ValueError(f"cannot read face image {path}: {_one_line(e)}") from None
    return arr.transpose(2, 0, 1)


class IdentityFolder:
    """A face dataset of one folder per identity, decoded once into memory.

    Attributes: ``images`` uint8 ``[N, 3, size, size]``, ``labels`` int64 ``[N]`` (0..K-1, the
    position of the identity in the sorted list ``identities``), ``identities``, ``paths``.
    Images come in a deterministic order: identities sorted, then file names sorted.
    ``identities`` restricts the dataset to those folders (e.g. one side of
    :func:`read_split_csv`); a name that is not a folder of ``root`` is an error.
    """

    def __init__(self, root: str | os.PathLike, identities: Sequence[str] | None = None,
                 size: int = 64) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"face image size must be a positive integer, got {size!r}")
        self.root = Path(root).expanduser()
        available = identity_folders(self.root)
        if identities is None:
            names = available
        else:
            if isinstance(identities, str):
                raise ValueError("identities must be a list of folder names, not one string")
            names = sorted(str(n) for n in identities)
            if not names:
                raise ValueError(f"no identity selected from {self.root}: the list is empty")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"identity {dup[0]!r} is listed twice for {self.root}")
            have = set(available)
            for n in names:
                if n not in have:
                    raise FileNotFoundError(f"identity folder {self.root / n} does not exist")
        self.size = size
        self.identities: list[str] = list(names)
        self.paths: list[Path] = []
        labels: list[int] = []
        for k, name in enumerate(names):
            files = identity_images(self.root / name)
            self.paths.extend(files)
            labels.extend([k] * len(files))
        images = np.empty((len(self.paths), 3, size, size), dtype=np.uint8)
        for i, p in enumerate(self.paths):
            images[i] = decode_face(p, size)
        self.images = torch.from_numpy(images)
        self.labels = torch.tensor(labels, dtype=torch.int64)

    @property
    def num_identities(self) -> int:
        return len(self.identities)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def __repr__(self) -> str:
        return (f"IdentityFolder({str(self.root)!r}, {len(self)} images, "
                f"{self.num_identities} identities, size={self.size})")


# ----------------------------------------------------------------------------- splits

def read_split_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """An identity split file: columns ``identity_dir`` and ``split`` (others ignored), one row
    per identity, ``split`` is ``train`` or ``test`` (the layout of faces.tar's
    ``SPLIT_SUGGESTED.csv``). Returns ``{"train": [...], "test": [...]}``, names sorted.

    An identity on two rows is an error (with the same split: a duplicate; with both: the split
    would not be open-set). Both sides must be non-empty.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        for col in ("identity_dir", "split"):
            if col not in fields:
                raise ValueError(f"split file {path} has no '{col}' column (columns: "
                                 f"{', '.join(fields) or 'none'}; expected identity_dir,...,split)")
        seen: dict[str, tuple[str, int]] = {}
        for line, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v
                   for k, v in row.items()}
            name, split = row.get("identity_dir") or "", row.get("split") or ""
            if not name and not split and not any(v for v in row.values() if isinstance(v, str)):
                continue  # blank line
            if not name:
                raise ValueError(f"split file {path} line {line}: empty identity_dir")
            if split not in SPLITS:
                raise ValueError(f"split file {path} line {line}: split {split!r} for {name!r}, "
                                 "expected 'train' or 'test'")
            if name in seen:
                other, first = seen[name]
                if other != split:
                    raise ValueError(f"split file {path}: identity {name!r} is in both train "
                                     f"(line {first if other == 'train' else line}) and test "
                                     f"(line {line if other == 'train' else first}); an open-set "
                                     "split needs disjoint identities")
                raise ValueError(f"split file {path}: identity {name!r} is listed twice "
                                 f"(lines {first} and {line})")
            seen[name] = (split, line)
    out = {s: sorted(n for n, (sp, _) in seen.items() if sp == s) for s in SPLITS}
    for s in SPLITS:
        if not out[s]:
            raise ValueError(f"split file {path} has no '{s}' identity")
    return out


def split_identities(identities: Sequence[str], test_fraction: float = 0.25,
                     seed: int = 0) -> dict[str, list[str]]:
    """A deterministic open-set split of identity names (for folders without a split CSV).

    The sorted names are permuted by ``numpy.random.default_rng(seed)``; the first
    ``round(test_fraction * K)`` (at least 1, at most K - 1) are the test identities. The same
    names, fraction and seed always give the same split, whatever order the names come in.
    """
    names = sorted(str(n) for n in identities)
    if len(names) < 2:
        raise ValueError(f"an identity split needs at least 2 identities, got {len(names)}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"identity {dup!r} is listed twice")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    n_test = min(len(names) - 1, max(1, round(float(test_fraction) * len(names))))
    order = np.random.default_rng(seed).permutation(len(names))
    test = {names[i] for i in order[:n_test]}
    return {"train": [n for n in names if n not in test], "test": [n for n in names if n in test]}


def check_verifiable(labels: Any) -> None:
    """Refuse a face test set without a genuine pair (an identity with >= 2 images) or without
    an impostor pair (>= 2 identities): verification and identification cannot be measured."""
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if lab.size == 0:
        raise ValueError("the face test set is empty: nothing to verify")
    _, counts = np.unique(lab, return_counts=True)
    if counts.size < 2:
        raise ValueError("the face test set has one identity: no impostor pair to verify")
    if counts.max() < 2:
        raise ValueError("the face test set has one image per identity: no genuine pair "
                         "to verify")


# ----------------------------------------------------------------------------- LFW pairs

class FacePair(NamedTuple):
    """One line of an LFW pairs file: ``same`` for a matched pair; ``fold`` counts from 0."""
    name1: str
    index1: int
    name2: str
    index2: int
    same: bool
    fold: int


def _positive_int(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) > 0 else None


def read_pairs_file(path: str | os.PathLike) -> list[FacePair]:
    """An LFW ``pairs.txt``-style file (Huang et al., LFW technical report 07-49, 2007).

    Header: ``<folds> <pairs per fold>`` (``pairs.txt``: ``10 300``) or ``<pairs>``
    (``pairsDevTrain.txt``). Then, per fold, ``pairs`` matched lines ``name idx1 idx2`` followed
    by ``pairs`` mismatched lines ``name1 idx1 name2 idx2`` (tab or space separated, image
    indices from 1). The number of lines must match the header.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [(i, ln.split()) for i, ln in enumerate(lines, start=1) if ln.strip()]
    if not rows:
        raise ValueError(f"pairs file {path} is empty: expected a header '<folds> <pairs>'")
    head_line, head = rows[0]
    nums = [_positive_int(t) for t in head]
    if not 1 <= len(head) <= 2 or any(n is None for n in nums):
        raise ValueError(f"pairs file {path} line {head_line}: header {' '.join(head)!r}, "
                         "expected '<folds> <pairs per fold>' or '<pairs>'")
    folds, per = (1, nums[0]) if len(nums) == 1 else (nums[0], nums[1])
    body = rows[1:]
    if len(body) != 2 * folds * per:
        raise ValueError(f"pairs file {path}: the header promises {folds} fold(s) of {per} "
                         f"matched + {per} mismatched pairs ({2 * folds * per} lines), "
                         f"found {len(body)} pair lines")
    pairs: list[FacePair] = []
    for k, (line, tok) in enumerate(body):
        fold, pos = divmod(k, 2 * per)
        matched = pos < per
        want = 3 if matched else 4
        if len(tok) == 3:
            i1, i2 = _positive_int(tok[1]), _positive_int(tok[2])
            pair = (tok[0], i1, tok[0], i2)
        elif len(tok) == 4:
            i1, i2 = _positive_int(tok[1]), _positive_int(tok[3])
            pair = (tok[0], i1, tok[2], i2)
        else:
            i1 = i2 = None
        if len(tok) != want or i1 is None or i2 is None:
            kind = "matched 'name idx1 idx2'" if matched else "mismatched 'name1 idx1 name2 idx2'"
            raise ValueError(f"pairs file {path} line {line}: expected a {kind} pair (image "
                             f"indices >= 1), got {' '.join(tok)!r}")
        pairs.append(FacePair(pair[0], pair[1], pair[2], pair[3], matched, fold))
    return pairs


def lfw_image_path(root: str | os.PathLike, name: str, index: int) -> Path:
    """LFW's file naming: ``root/<name>/<name>_<index:04d>.jpg``."""
    return Path(root).expanduser() / name / f"{name}_{index:04d}.jpg"


def pair_paths(root: str | os.PathLike, pairs: Sequence[FacePair]) -> list[tuple[Path, Path]]:
    """The two image files of each pair under an LFW-layout ``root``; a missing file is an
    error naming it and the pair."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"LFW image folder {root} does not exist")
    out = []
    checked: set[Path] = set()
    for k, p in enumerate(pairs, start=1):
        a = lfw_image_path(root, p.name1, p.index1)
        b = lfw_image_path(root, p.name2, p.index2)
        for f in (a, b):
            if f not in checked:
                if not f.is_file():
                    raise FileNotFoundError(f"pair {k} ({p.name1} {p.index1} / {p.name2} "
                                            f"{p.index2}): image {f} does not exist")
                checked.add(f)
        out.append((a, b))
    return out


class PairImages(NamedTuple):
    """The images of a pairs file, each decoded once: ``images`` uint8 ``[U, 3, size, size]``
    (``paths[i]`` is row ``i``), ``index`` int64 ``[P, 2]`` the rows of each pair's two images."""
    images: torch.Tensor
    index: np.ndarray
    paths: list[Path]


def _crop_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"centre-crop fraction must lie in (0, 1], got {fraction!r}")
    return float(fraction)


def center_crop_face(path: Path, size: int, fraction: float = 1.0) -> np.ndarray:
    """:func:`decode_face` of the central ``fraction`` of the image (per side): the image is
    resized to ``round(size / fraction)`` and its central ``size × size`` pixels are kept (the
    central ``fraction``, up to the rounding of one pixel). ``fraction`` 1: the whole image."""
    full = max(size, round(size / _crop_fraction(fraction)))
    arr = decode_face(path, full)
    top = (full - size) // 2
    return np.ascontiguousarray(arr[:, top:top + size, top:top + size])


def pair_images(root: str | os.PathLike, pairs: Sequence[FacePair], size: int,
                center_crop: float = 1.0, quiet: bool = True) -> PairImages:
    """Every image of ``pairs`` under an LFW-layout ``root`` (:func:`pair_paths`: a missing file
    is named with its pair), decoded once however many pairs use it, in order of first use,
    resized to ``size`` (:func:`center_crop_face`). No alignment: LFW's images are 250×250
    with the face centred, the Viola–Jones detector's box enlarged 2.2 times per side (Huang et
    al. 2007), so the face spans about the central 1/2.2 ≈ 45% of each side; a network
    trained on tight face crops should be given a ``center_crop`` fraction that matches them.
    ``quiet=False`` shows the progress of the decoding (:func:`dcmkd.progress.track`)."""
    from dcmkd.progress import track

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"face image size must be a positive integer, got {size!r}")
    _crop_fraction(center_crop)
    rows: dict[Path, int] = {}
    index = np.array([[rows.setdefault(a, len(rows)), rows.setdefault(b, len(rows))]
                      for a, b in pair_paths(root, pairs)], dtype=np.int64).reshape(-1, 2)
    images = np.empty((len(rows), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(track(list(rows), what="decoding pair images", unit="img",
                                   quiet=quiet)):
        images[i] = center_crop_face(path, size, center_crop)
    return PairImages(torch.from_numpy(images), index, list(rows))
