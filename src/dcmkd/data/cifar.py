"""CIFAR-10 / CIFAR-100 from the official "python version" archives.

The archives hold pickled dicts (written by Python 2): ``b'data'`` is an N×3072 uint8 numpy
array whose rows are three 32×32 planes R, G, B in row-major order, ``b'labels'`` (CIFAR-10) or
``b'fine_labels'`` (CIFAR-100) a list of ints. Pickles are read with a restricted unpickler that
only resolves the numpy callables an array needs, so a tampered file cannot run code.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dcmkd.registry import UnknownNameError


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and how its files are laid out."""

    url: str
    md5: str
    folder: str                 # the folder the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    title: str

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def files(self, train: bool) -> tuple[str, ...]:
        return (self.train_files if train else self.test_files) + (self.meta_file,)


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key=b"labels", names_key=b"label_names",
        num_classes=10, title="CIFAR-10"),
    "cifar100": CifarSpec(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
        train_files=("train",), test_files=("test",), meta_file="meta",
        label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100,
        title="CIFAR-100"),
}


class CifarFormatError(ValueError):
    """A CIFAR file that is not a valid python-version pickle (corrupt, truncated or tampered)."""


def _spec(name: str) -> CifarSpec:
    if name not in CIFAR:
        raise UnknownNameError("CIFAR dataset", name, CIFAR)
    return CIFAR[name]


# ----------------------------------------------------------------------------- restricted pickle

def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: what numpy needs to rebuild an array.

    The official files (numpy 1.x, Python 2) name ``numpy.core.multiarray._reconstruct``;
    numpy ≥ 2 writes ``numpy._core.multiarray._reconstruct``. Both resolve to the same function,
    looked up here without importing the deprecated ``numpy.core`` alias.
    """
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3's pickle protocols 0-2 write bytes as _codecs.encode(text, "latin1")
        ("_codecs", "encode"): _latin1_bytes,
    }


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What a protocol-2 pickle (a CIFAR file re-pickled by Python 3) rebuilds its bytes with;
    only the latin-1 round trip is accepted (no other codec runs)."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1") or \
            not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with {encoding!r}: a CIFAR file "
                                     "only holds latin-1 encoded bytes")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except numpy's array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': a CIFAR file only holds dicts, lists, "
            "bytes and numpy arrays")


def read_pickle(path: str | os.PathLike) -> dict:
    """Load one CIFAR pickle safely; a failure raises :class:`CifarFormatError` naming ``path``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        raise CifarFormatError(
            f"{path} is not a valid CIFAR python-version file ({type(e).__name__}: {e}); "
            "delete it and download/extract the archive again") from e
    if not isinstance(obj, dict):
        raise CifarFormatError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    # a file re-pickled after loading with encoding="latin1" has str keys: the same entries
    return {k.encode("latin1") if isinstance(k, str) else k: v for k, v in obj.items()}


# ----------------------------------------------------------------------------- download

def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tar archive, refusing absolute paths, '..' components, links and devices."""
    dest = Path(dest)
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            parts = Path(m.name).parts
            if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in parts:
                raise ValueError(f"{archive}: refusing unsafe member path '{m.name}'")
            if not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing member '{m.name}' (not a file or folder)")
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)


def download_cifar(name: str, root: str | os.PathLike, url: str | None = None,
                   md5: str | None = None, *, progress: Callable[[int, int], None] | None = None
                   ) -> Path:
    """Download the official archive of ``name`` into ``root``, check its md5, extract it.

    ``url`` / ``md5`` default to the official ones (overridable for mirrors and tests). An archive
    already in ``root`` with the right md5 is not downloaded again. Returns the extracted folder.
    Raises ``ValueError`` on an md5 mismatch (the bad file is removed) and ``urllib.error.URLError``
    / ``OSError`` when the server cannot be reached.
    """
    spec = _spec(name)
    url, md5 = url or spec.url, md5 or spec.md5
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.archive
    if not (archive.is_file() and md5sum(archive) == md5):
        fd, tmp = tempfile.mkstemp(dir=root, prefix=spec.archive, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                total, done = int(resp.headers.get("Content-Length") or 0), 0
                while block := resp.read(1 << 20):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            got = md5sum(tmp)
            if got != md5:
                raise ValueError(f"md5 mismatch for {url}: expected {md5}, got {got} "
                                 "(incomplete or tampered download; nothing was kept)")
            os.replace(tmp, archive)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    safe_extract(archive, root)
    return root / spec.folder


# ----------------------------------------------------------------------------- loading

def _locate(spec: CifarSpec, root: Path, train: bool) -> Path | None:
    """The folder holding the files: ``root/<folder>`` or ``root`` itself."""
    for folder in (root / spec.folder, root):
        if all((folder / f).is_file() for f in spec.files(train)):
            return folder
    return None


def _missing_message(spec: CifarSpec, root: Path, train: bool, cause: str = "") -> str:
    folder = root / spec.folder
    if (root / "train").is_dir():   # an image folder, as ../shared/data's CIFAR-10 copy
        return (f"{root} holds an image folder (train/<class>/...), not the {spec.title} python "
                f"archive's files: read it with -d folder (data.name=folder)")
    missing = [str(folder / f) for f in spec.files(train) if not (folder / f).is_file()]
    return (f"{spec.title} {'training' if train else 'test'} files not found{cause}. "
            f"Expected in {folder}: {', '.join(spec.files(train))} "
            f"(missing: {', '.join(missing)}). To get them, add data.download=true to the "
            f"command (DataConfig(download=True) in Python) to fetch {spec.url} (md5 "
            f"{spec.md5}), or download that archive "
            f"yourself and extract it in {root} so that the folder {spec.folder}/ is inside it.")


def _names(meta: dict, spec: CifarSpec, path: Path) -> list[str]:
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise CifarFormatError(f"{path}: expected {spec.num_classes} class names under "
                               f"{spec.names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _batch(d: dict, spec: CifarSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, labels = d.get(b"data"), d.get(spec.label_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072 \
            or data.dtype != np.uint8:
        raise CifarFormatError(f"{path}: b'data' must be an N×3072 uint8 array")
    if labels is None or len(labels) != len(data):
        raise CifarFormatError(f"{path}: expected {len(data)} labels under {spec.label_key!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise CifarFormatError(f"{path}: labels outside 0..{spec.num_classes - 1}")
    return data, labels


def load_cifar(name: str, root: str | os.PathLike, train: bool, download: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load a CIFAR split: ``(images uint8 [N,3,32,32], labels int64 [N], class names)``.

    ``root`` is the folder holding ``cifar-10-batches-py/`` / ``cifar-100-python/`` (or that
    folder itself). Missing files are downloaded when ``download`` is true; otherwise, or when the
    download fails, a ``FileNotFoundError`` says which files were expected where.
    """
    spec, root = _spec(name), Path(root).expanduser()
    folder = _locate(spec, root, train)
    if folder is None:
        if not download:
            raise FileNotFoundError(_missing_message(spec, root, train))
        try:
            download_cifar(name, root)
        except (urllib.error.URLError, OSError) as e:
            raise FileNotFoundError(_missing_message(
                spec, root, train, f" and the download failed ({e})")) from e
        folder = _locate(spec, root, train)
        if folder is None:
            raise FileNotFoundError(_missing_message(spec, root, train, " after download"))
    classes = _names(read_pickle(folder / spec.meta_file), spec, folder / spec.meta_file)
    datas, labels = [], []
    for f in (spec.train_files if train else spec.test_files):
        d, y = _batch(read_pickle(folder / f), spec, folder / f)
        datas.append(d)
        labels.append(y)
    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels)), classes
