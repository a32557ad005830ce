"""CIFAR python-version files: format, channel order, md5, safe extraction, restricted unpickling.

The tests write tiny files in the official format themselves: Python-2 pickles (``str`` as
BINSTRING opcodes, read back as bytes with ``encoding='bytes'``) whose arrays name
``numpy.core.multiarray._reconstruct``, exactly as the files from the Toronto site do.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from dcmkd.data import build_data, download_cifar, load_cifar
from dcmkd.data import cifar as cifar_mod
from dcmkd.data.cifar import CifarFormatError, read_pickle, safe_extract
from dcmkd.registry import UnknownNameError


class _Py2Pickler(pickle._Pickler):
    """Writes ``bytes``/``str`` the way Python 2's cPickle wrote ``str`` (protocol 2)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        n = len(obj)
        head = (pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                else pickle.BINSTRING + struct.pack("<i", n))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _py2_str
    dispatch[str] = _py2_str


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    data = f.getvalue()
    # numpy 1.x (which wrote the official files) lived in numpy.core
    return data.replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                        b"cnumpy.core.multiarray\n_reconstruct\n")


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)


def write_cifar10(root, per_batch: int = 3, n_test: int = 4, modern: bool = False) -> dict:
    """Tiny CIFAR-10 in ``root/cifar-10-batches-py``; returns the expected tensors."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    dump = (lambda o: pickle.dumps(o, protocol=4)) if modern else py2_pickle
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(dump({
        b"label_names": [n.encode() for n in names], b"num_cases_per_batch": per_batch,
        b"num_vis": 3072}))
    train_x, train_y = [], []
    for i in range(1, 6):
        x = _images(per_batch, i)
        y = [(i + j) % 10 for j in range(per_batch)]
        (folder / f"data_batch_{i}").write_bytes(dump({
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": y,
            b"data": x.reshape(per_batch, 3072), b"filenames": [b"f.png"] * per_batch}))
        train_x.append(x)
        train_y += y
    tx, ty = _images(n_test, 99), [9 - j % 10 for j in range(n_test)]
    (folder / "test_batch").write_bytes(dump({
        b"batch_label": b"testing batch 1 of 1", b"labels": ty,
        b"data": tx.reshape(n_test, 3072), b"filenames": [b"t.png"] * n_test}))
    return {"train": (np.concatenate(train_x), train_y), "test": (tx, ty), "classes": names}


def write_cifar100(root, n_train: int = 6, n_test: int = 2) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = [f"class{i:03d}" for i in range(100)]
    (folder / "meta").write_bytes(py2_pickle({
        b"fine_label_names": [n.encode() for n in fine],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}))
    out = {"classes": fine}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        x = _images(n, seed)
        y = [(17 * j + seed) % 100 for j in range(n)]
        (folder / split).write_bytes(py2_pickle({
            b"filenames": [b"a.png"] * n, b"batch_label": split.encode(), b"fine_labels": y,
            b"coarse_labels": [v // 5 for v in y], b"data": x.reshape(n, 3072)}))
        out[split] = (x, y)
    return out


def test_load_cifar10_pixels_labels_classes(tmp_path):
    expected = write_cifar10(tmp_path)
    for train in (True, False):
        x, y, classes = load_cifar("cifar10", tmp_path, train=train)
        ex, ey = expected["train" if train else "test"]
        assert x.dtype == torch.uint8 and x.shape == (len(ey), 3, 32, 32)
        assert y.dtype == torch.int64 and y.tolist() == ey
        assert torch.equal(x, torch.from_numpy(ex))
        assert classes == expected["classes"]


def test_channel_order_is_rgb_planes_row_major(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    row = np.zeros(3072, np.uint8)
    row[:1024], row[1024:2048], row[2048:] = 200, 100, 50   # R, G, B planes
    row[1], row[32] = 7, 9                                  # R at (y0, x1) and (y1, x0)
    (folder / "test_batch").write_bytes(py2_pickle({b"labels": [3], b"data": row[None]}))
    x, y, _ = load_cifar("cifar10", tmp_path, train=False)
    assert x[0, :, 5, 5].tolist() == [200, 100, 50]
    assert x[0, 0, 0, 1] == 7 and x[0, 0, 1, 0] == 9 and y.tolist() == [3]


def test_load_cifar100_fine_labels(tmp_path):
    expected = write_cifar100(tmp_path)
    x, y, classes = load_cifar("cifar100", tmp_path, train=True)
    assert torch.equal(x, torch.from_numpy(expected["train"][0]))
    assert y.tolist() == expected["train"][1] and len(classes) == 100
    assert classes[5] == "class005"
    x, y, _ = load_cifar("cifar100", tmp_path, train=False)
    assert y.tolist() == expected["test"][1]


def test_modern_pickles_and_root_being_the_folder(tmp_path):
    expected = write_cifar10(tmp_path, modern=True)
    x, y, _ = load_cifar("cifar10", tmp_path / "cifar-10-batches-py", train=True)
    assert torch.equal(x, torch.from_numpy(expected["train"][0]))


def test_missing_files_message_names_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_cifar("cifar10", tmp_path, train=True)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "batches.meta" in msg and "data.download=true" in msg
    assert "cifar-10-python.tar.gz" in msg
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar("cifar100", tmp_path, train=False)


def test_offline_download_gives_file_not_found(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*no network"):
        load_cifar("cifar10", tmp_path, train=True, download=True)


def test_unknown_cifar_name(tmp_path):
    with pytest.raises(UnknownNameError):
        load_cifar("cifar1000", tmp_path, train=True)


# ----------------------------------------------------------------------------- download

def _archive(tmp_path, name: str = "src") -> tuple:
    src = tmp_path / name
    expected = write_cifar10(src)
    tgz = tmp_path / "mirror.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return tgz, hashlib.md5(tgz.read_bytes()).hexdigest(), expected


def test_download_file_url_verifies_md5_and_extracts(tmp_path):
    tgz, md5, expected = _archive(tmp_path)
    root = tmp_path / "root"
    folder = download_cifar("cifar10", root, url=tgz.as_uri(), md5=md5)
    assert folder == root / "cifar-10-batches-py"
    x, y, _ = load_cifar("cifar10", root, train=True)
    assert torch.equal(x, torch.from_numpy(expected["train"][0]))
    assert [p.name for p in root.iterdir() if p.name.endswith(".part")] == []


def test_download_rejects_wrong_md5(tmp_path):
    tgz, md5, _ = _archive(tmp_path)
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="md5 mismatch"):
        download_cifar("cifar10", root, url=tgz.as_uri(), md5="0" * 32)
    assert list(root.iterdir()) == []  # nothing kept, nothing extracted


def test_default_download_uses_official_url_and_md5(tmp_path, monkeypatch):
    tgz, _, _ = _archive(tmp_path)
    seen = []

    class Response(io.BytesIO):
        headers: dict = {}

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return Response(tgz.read_bytes())

    monkeypatch.setattr(cifar_mod.urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(ValueError, match="c58f30108f718f92721af3b95e74349a"):
        download_cifar("cifar10", tmp_path / "root")  # our archive is not the official one
    assert seen == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]


def test_safe_extract_rejects_parent_and_absolute_paths(tmp_path):
    for bad in ("../evil.txt", "/tmp/evil-abs.txt", "a/../../evil.txt"):
        tgz = tmp_path / "bad.tar.gz"
        with tarfile.open(tgz, "w:gz") as tar:
            info = tarfile.TarInfo(bad)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
        dest = tmp_path / "dest"
        dest.mkdir(exist_ok=True)
        with pytest.raises(ValueError, match="unsafe"):
            safe_extract(tgz, dest)
        assert not (tmp_path / "evil.txt").exists() and list(dest.iterdir()) == []


def test_safe_extract_rejects_symlinks(tmp_path):
    tgz = tmp_path / "link.tar"
    with tarfile.open(tgz, "w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="not a file"):
        safe_extract(tgz, tmp_path / "dest")


# ----------------------------------------------------------------------------- unpickling

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_execution(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2))
    assert b"system" in bad.read_bytes()  # the payload really names os.system / posix.system
    with pytest.raises(CifarFormatError, match="refusing to load global") as e:
        load_cifar("cifar10", tmp_path, train=True)
    assert str(bad) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=2),
    pickle.dumps(np.float64(1.0), protocol=2),    # numpy scalars are not in a CIFAR file
    pickle.dumps({b"x": np.arange(3)}, protocol=5),  # _frombuffer / PickleBuffer not needed
])
def test_restricted_unpickler_refuses_other_globals(tmp_path, payload):
    p = tmp_path / "f"
    p.write_bytes(payload)
    with pytest.raises(CifarFormatError):
        read_pickle(p)


def test_corrupt_pickle_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    with pytest.raises(CifarFormatError, match="test_batch"):
        load_cifar("cifar10", tmp_path, train=False)


def test_bad_content_is_rejected(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(py2_pickle({
        b"labels": [12], b"data": np.zeros((1, 3072), np.uint8)}))
    with pytest.raises(CifarFormatError, match="labels outside"):
        load_cifar("cifar10", tmp_path, train=False)
    (folder / "test_batch").write_bytes(py2_pickle({
        b"labels": [1], b"data": np.zeros((1, 1024), np.uint8)}))
    with pytest.raises(CifarFormatError, match="3072"):
        load_cifar("cifar10", tmp_path, train=False)


def test_build_data_cifar10_with_noise_and_subset(tmp_path):
    write_cifar10(tmp_path, per_batch=8, n_test=5)
    data = build_data({"name": "cifar10", "root": str(tmp_path), "batch_size": 4,
                       "test_batch_size": 3, "label_noise": 0.5, "train_subset": 20},
                      "cpu", seed=1)
    assert data.num_classes == 10 and data.input_size == 32 and data.classes[0] == "airplane"
    assert len(data.train.labels) == 20 and len(data.train) == 5
    assert data.noisy_indices is not None and len(data.noisy_indices) == 10
    assert data.mean == (0.4914, 0.4822, 0.4465)
    xs = [x for x, _ in data.test]
    assert [len(x) for x in xs] == [3, 2] and xs[0].dtype == torch.float32
