"""Image-folder datasets: ``root/<split>/<class>/<image>``, ImageNet layout included.

Class index = position of the class folder name in the sorted list of class folders. Small
datasets (every image the same size, at most ``CACHE_MAX_SIZE`` pixels a side) are decoded once
into a uint8 cache file; large ones (ImageNet) are decoded per sample by :class:`FolderStream`.
"""
from __future__ import annotations

import functools
import hashlib
import multiprocessing
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from dcmkd.progress import Progress

#: file endings recognised as images (case-insensitive)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: the largest side (pixels) for which a folder dataset is decoded into the in-memory cache
CACHE_MAX_SIZE = 64
#: bumped whenever the cache file layout changes
_CACHE_VERSION = 2   # 2: 16-bit images scaled to 8 bits, not clipped
#: below this many images decoding runs in-process (a pool costs more than it saves)
_POOL_MIN_IMAGES = 4096


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("image-folder datasets need Pillow: pip install 'dcmkd[train]'") from e
    return Image


# ----------------------------------------------------------------------------- scanning

def split_dir(root: str | os.PathLike, split: str) -> Path:
    """The folder of ``split``; ``'test'`` falls back to ``'val'`` (ImageNet) and vice versa."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image-folder root {root} does not exist")
    names = {"test": ("test", "val"), "val": ("val", "test")}.get(split, (split,))
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(
        f"no '{split}' split in {root}: expected the folder "
        f"{' or '.join(str(root / n) for n in names)} holding one sub-folder per class")


def class_folders(folder: Path) -> list[str]:
    """Sorted names of the (non-hidden) sub-folders of ``folder``."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _iter_images(folder: Path) -> Iterator[str]:
    """Image files under ``folder``, recursively, in sorted order (hidden entries skipped).

    Links to folders are followed, but no folder twice (a link loop, or two links to one
    folder, would repeat its images)."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (os.path.join(dirpath, n) for n in sorted(filenames) if _is_image(n))


def _refuse_duplicates(paths: list[str], labels: list[int], classes: list[str]) -> None:
    """One image file reached twice (through links) would count twice, or under two labels."""
    first: dict[tuple[int, int], int] = {}
    for i, p in enumerate(paths):
        st = os.stat(p)
        j = first.setdefault((st.st_dev, st.st_ino), i)
        if j != i:
            where = (f"both class '{classes[labels[j]]}' and class '{classes[labels[i]]}'"
                     if labels[i] != labels[j] else f"class '{classes[labels[i]]}' twice")
            raise ValueError(f"the image {os.path.realpath(p)} is in {where} ({paths[j]} and "
                             f"{p}, through a link): remove the duplicate link")


def scan_folder(root: str | os.PathLike, split: str) -> tuple[list[str], list[int], list[str]]:
    """List a split: ``(image paths, class indices, class names)``, in sorted class/file order.

    Images are found recursively inside each class folder. Raises when the split folder is
    missing, holds no class folders, a class folder holds no image, or (for a split other than
    ``train``) its class folders differ from those of ``train``.
    """
    folder = split_dir(root, split)
    classes = class_folders(folder)
    if not classes:
        loose = [n for n in os.listdir(folder) if _is_image(n)]
        hint = (f" ({len(loose)} images lie directly in it: sort them into class folders, e.g. "
                "ImageNet's validation images with its valprep script)") if loose else ""
        raise FileNotFoundError(f"{folder} holds no class sub-folders{hint}")
    if folder.name != "train" and (Path(root).expanduser() / "train").is_dir():
        train_classes = class_folders(Path(root).expanduser() / "train")
        if train_classes != classes:
            only_train = sorted(set(train_classes) - set(classes))
            only_here = sorted(set(classes) - set(train_classes))
            raise ValueError(
                f"class folders differ between {Path(root) / 'train'} and {folder}: "
                f"only in train: {only_train[:10] or 'none'}; only in {folder.name}: "
                f"{only_here[:10] or 'none'}")
    paths: list[str] = []
    labels: list[int] = []
    for index, cls in enumerate(classes):
        found = list(_iter_images(folder / cls))
        if not found:
            raise FileNotFoundError(
                f"class folder {folder / cls} holds no images ({', '.join(IMG_EXTENSIONS)})")
        paths.extend(found)
        labels.extend([index] * len(found))
    _refuse_duplicates(paths, labels, classes)
    return paths, labels, classes


def first_image(root: str | os.PathLike, split: str) -> str:
    """The first image of a split in scan order, found without listing the whole split."""
    folder = split_dir(root, split)
    for cls in class_folders(folder):
        for path in _iter_images(folder / cls):
            return path
    raise FileNotFoundError(f"no images under {folder}")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image, read from its header only."""
    with _pil().open(path) as im:
        return im.size


# ----------------------------------------------------------------------------- decoding

def decode_image(path: str, size: tuple[int, int] | None = None, draft: bool = False) -> np.ndarray:
    """Decode one image to RGB uint8 HWC; resized (bilinear) to ``size`` = (width, height) if given.

    ``draft`` lets the JPEG decoder shrink by a power of two first (never below ``size``), which
    makes decoding large photos several times faster.
    """
    Image = _pil()
    try:
        with Image.open(path) as im:
            if size is not None and draft and im.format == "JPEG":
                im.draft("RGB", size)
            if im.mode in WIDE_MODES:
                im = _eight_bits(im, path)
            if im.mode != "RGB":
                im = im.convert("RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.BILINEAR)
            return np.asarray(im)
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError) as e:   # truncated, corrupt, not an image
        raise BadImage(f"{path}: cannot decode this image ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0][:120]}); remove it, or set "
                       "data.skip_bad_images=true to leave such files out") from None


#: Pillow's modes of one channel wider than 8 bits: 16-bit greyscale PNG/TIFF opens as
#: ``I;16*`` (or ``I``, 32-bit integers, in older Pillow); ``F`` is 32-bit float
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _eight_bits(im: Any, path: str) -> Any:
    """A greyscale image of more than 8 bits as 8-bit ``L``: integer values are taken as 16-bit
    (0..65535, what PNG and TIFF store; Pillow's own ``convert`` clips them at 255 instead) and
    scaled by 255/65535, rounded. A float image (no known range) or an integer image with values
    beyond 16 bits is refused, naming the file."""
    Image = _pil()
    if im.mode == "F":
        raise BadImage(f"{path}: a 32-bit float image (mode F) has no known value range; "
                       "convert it to 8- or 16-bit first")
    a = np.asarray(im).astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise BadImage(f"{path}: a {im.mode} image with values {a.min()}..{a.max()}, outside "
                       "16 bits; convert it to 8- or 16-bit first")
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")


class BadImage(ValueError):
    """An image file that cannot be decoded; the message names it."""


def _decode_or_none(path: str, skip_bad: bool) -> np.ndarray | None:
    try:
        return decode_image(path)
    except BadImage:
        if skip_bad:
            return None
        raise


def _decode_chunk(paths: list[str], skip_bad: bool = False,
                  done: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
    """Decode images that all share one size into one uint8 NHWC array; with ``skip_bad``,
    undecodable files are left out. Returns the array and the indices of the images kept;
    ``done(1)`` is called after each image (progress)."""
    def decode(p: str) -> np.ndarray | None:
        img = _decode_or_none(p, skip_bad)
        if done is not None:
            done(1)
        return img

    decoded = ((i, decode(p)) for i, p in enumerate(paths))
    kept_pairs = ((i, img) for i, img in decoded if img is not None)
    first_pair = next(kept_pairs, None)
    if first_pair is None:
        return np.empty((0, 1, 1, 3), np.uint8), []
    i0, first = first_pair
    out = np.empty((len(paths),) + first.shape, np.uint8)
    out[0], kept = first, [i0]
    for i, img in kept_pairs:
        p = paths[i]
        if img.shape != first.shape:
            raise ValueError(
                f"{p} is {img.shape[1]}×{img.shape[0]} but {paths[i0]} is "
                f"{first.shape[1]}×{first.shape[0]}: a cached folder dataset needs every image "
                "the same size (resize them, or use the streaming loader)")
        out[len(kept)] = img
        kept.append(i)
    return out[:len(kept)], kept


def decode_all(paths: list[str], workers: int = 2, skip_bad: bool = False
               ) -> tuple[np.ndarray, list[int]]:
    """Decode same-size images into uint8 NCHW, with a pool of ``workers`` processes when
    large; returns the array and the indices of the images kept (all, unless ``skip_bad``
    leaves undecodable files out)."""
    if workers > 1 and len(paths) >= _POOL_MIN_IMAGES and \
            "fork" in multiprocessing.get_all_start_methods():
        step = -(-len(paths) // (workers * 8))
        starts = range(0, len(paths), step)
        with multiprocessing.get_context("fork").Pool(workers) as pool, \
                Progress(len(paths), "decoding images", unit="img") as shown:
            parts = []   # in order; progress as each chunk arrives (issue 28: silent decode)
            for start, part in zip(starts, pool.imap(
                    functools.partial(_decode_chunk, skip_bad=skip_bad),
                    [paths[i:i + step] for i in starts])):
                parts.append(part)
                shown.update(min(step, len(paths) - start))
        shapes = {p.shape[1:] for p, kept in parts if kept}
        if len(shapes) > 1:
            raise ValueError(f"images of different sizes {sorted(shapes)} under "
                             f"{os.path.commonpath(paths)}: a cached folder dataset needs one size")
        nhwc = np.concatenate([p for p, kept in parts if kept])
        kept = [start + i for start, (_, k) in zip(starts, parts) for i in k]
    else:
        with Progress(len(paths), "decoding images", unit="img") as shown:
            nhwc, kept = _decode_chunk(paths, skip_bad, shown.update)
    if not kept:
        raise ValueError(f"no image under {os.path.commonpath(paths)} could be decoded")
    if len(kept) < len(paths):
        left_out = sorted(set(range(len(paths))) - set(kept))
        warnings.warn(f"data.skip_bad_images: left out {len(left_out)} undecodable image(s), "
                      f"e.g. {paths[left_out[0]]}", stacklevel=2)
    return np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2)), kept


# ----------------------------------------------------------------------------- cache

def default_cache_dir() -> Path:
    """``$DCMKD_CACHE``, else ``$XDG_CACHE_HOME/dcmkd``, else ``~/.cache/dcmkd``."""
    if os.environ.get("DCMKD_CACHE"):
        return Path(os.environ["DCMKD_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcmkd"


def cache_key(paths: list[str], labels: list[int], classes: list[str]) -> str:
    """Hash of the file list with sizes, mtimes, labels and classes: any change, a new key."""
    h = hashlib.sha256(f"dcmkd-folder-cache-v{_CACHE_VERSION}\n".encode())
    h.update("\0".join(classes).encode("utf-8") + b"\n")
    for p, y in zip(paths, labels):
        st = os.stat(p)
        h.update(f"{p}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _cache_prefix(root: str | os.PathLike, split: str) -> str:
    root = Path(root).expanduser().resolve()
    tag = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.name)[:40]
    return f"folder-{safe}-{tag}-{split}-"


def _write_atomic(path: Path, **arrays: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a cache is as readable as data
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_folder_cached(root: str | os.PathLike, split: str,
                       cache_dir: str | os.PathLike | None = None, *, workers: int = 2,
                       skip_bad: bool = False,
                       scan: tuple[list[str], list[int], list[str]] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A small image-folder split as ``(uint8 [N,3,H,W], int64 labels [N], class names)``.

    The first call decodes every image (all must share one size) and writes
    ``<cache_dir>/folder-<name>-<hash>-<split>-<key>.npz`` atomically; later calls load it
    without decoding. The key hashes paths, sizes and mtimes, so adding, removing or touching a
    file invalidates it (stale caches of the same folder and split are removed). An image that
    cannot be decoded is an error naming it, or, with ``skip_bad``, left out with a warning.
    ``scan``: the split's :func:`scan_folder`, when the caller has it already.
    """
    paths, labels, classes = scan if scan is not None else scan_folder(root, split)
    key = cache_key(paths, labels, classes) + ("-skip-bad" if skip_bad else "")
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    prefix = _cache_prefix(root, split)
    path = cache_dir / f"{prefix}{key[:24]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    return (torch.from_numpy(z["images"]), torch.from_numpy(z["labels"]),
                            [str(c) for c in z["classes"]])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign cache file: rebuild it
    images, kept = decode_all(paths, workers, skip_bad)
    y = np.asarray(labels, dtype=np.int64)[kept]
    cache_dir.mkdir(parents=True, exist_ok=True)
    for old in cache_dir.glob(f"{prefix}*.npz"):
        if old != path:
            old.unlink(missing_ok=True)
    _write_atomic(path, images=images, labels=y, classes=np.asarray(classes, dtype=str),
                  key=np.asarray(key))
    return torch.from_numpy(images), torch.from_numpy(y), list(classes)


# ----------------------------------------------------------------------------- streaming

class FolderStream(Dataset):
    """An image-folder split decoded per sample: ``(uint8 [3,size,size], label)``.

    Every image is resized to ``size``×``size`` (bilinear; SPEC.md §3: ImageNet images are resized
    to 256×256, random / centre 224 crops are taken on the device). Meant for a DataLoader with
    worker processes (see :class:`dcmkd.data.loader.StreamLoader`).
    """

    def __init__(self, root: str | os.PathLike, split: str, size: int = 256, draft: bool = True,
                 skip_bad: bool = False):
        self.paths, labels, self.classes = scan_folder(root, split)
        self.labels = torch.tensor(labels, dtype=torch.int64)
        self.size, self.draft, self.skip_bad = size, draft, skip_bad

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, indices: torch.Tensor) -> "FolderStream":
        """A copy holding only the samples at ``indices`` (in that order)."""
        out = object.__new__(FolderStream)
        out.__dict__.update(self.__dict__)
        out.paths = [self.paths[int(i)] for i in indices]
        out.labels = self.labels[torch.as_tensor(indices, dtype=torch.int64)].clone()
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample ``index``; with ``skip_bad``, an undecodable image is replaced by the next
        decodable one (with its label), with a warning."""
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            try:
                img = decode_image(self.paths[i], (self.size, self.size), draft=self.draft)
            except BadImage as e:
                if not self.skip_bad:
                    raise
                warnings.warn(f"data.skip_bad_images: {e}", stacklevel=2)
                continue
            chw = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
            return chw, int(self.labels[i])
        raise ValueError("no image of the dataset could be decoded")
