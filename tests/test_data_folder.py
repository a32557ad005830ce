"""Image-folder datasets: scanning, errors, the decoded cache, streaming, real CIFAR-10 JPEGs."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcmkd.data import FolderStream, build_data, load_folder_cached, scan_folder
from dcmkd.data import folder as folder_mod
from dcmkd.data.loader import StreamLoader

CIFAR_JPG = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def _pixels(label: int, i: int, size: int, split: str) -> np.ndarray:
    rng = np.random.default_rng(1000 * label + 10 * i + (split == "test"))
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_folder(root: Path, classes=("cat", "ant", "bee"), n: int = 3, size: int = 8,
                splits=("train", "test")) -> dict:
    """PNG image folder; returns ``{split: (images uint8 NCHW in scan order, labels)}``."""
    out = {}
    order = sorted(classes)
    for split in splits:
        xs, ys = [], []
        for label, cls in enumerate(order):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                px = _pixels(label, i, size, split)
                Image.fromarray(px).save(root / split / cls / f"img{i}.png")
                xs.append(px.transpose(2, 0, 1))
                ys.append(label)
        out[split] = (np.stack(xs), ys)
    return out


def test_scan_folder_classes_labels_order(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "ant" / "sub").mkdir()
    Image.fromarray(_pixels(0, 9, 8, "train")).save(tmp_path / "train" / "ant" / "sub" / "Z.PNG")
    paths, labels, classes = scan_folder(tmp_path, "train")
    assert classes == ["ant", "bee", "cat"]
    assert labels == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    names = [os.path.relpath(p, tmp_path / "train") for p in paths]
    assert names[:4] == ["ant/img0.png", "ant/img1.png", "ant/img2.png", "ant/sub/Z.PNG"]


def test_val_is_used_when_there_is_no_test(tmp_path):
    make_folder(tmp_path, splits=("train", "val"))
    _, labels, classes = scan_folder(tmp_path, "test")
    assert classes == ["ant", "bee", "cat"] and len(labels) == 9


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(tmp_path / "nope", "train")
    make_folder(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match="no 'test' split.*val"):
        scan_folder(tmp_path, "test")
    (tmp_path / "test").mkdir()
    Image.fromarray(_pixels(0, 0, 8, "test")).save(tmp_path / "test" / "loose.png")
    with pytest.raises(FileNotFoundError, match="no class sub-folders.*1 images lie directly"):
        scan_folder(tmp_path, "test")
    (tmp_path / "test" / "ant").mkdir()
    (tmp_path / "test" / "bee").mkdir()
    (tmp_path / "test" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"only in train: \['cat'\]; only in test: \['dog'\]"):
        scan_folder(tmp_path, "test")
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no images"):
        scan_folder(tmp_path, "train")


def test_cached_pixels_labels_and_reuse(tmp_path, monkeypatch):
    expected = make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    for split in ("train", "test"):
        x, y, classes = load_folder_cached(tmp_path / "data", split, cache)
        assert x.dtype == torch.uint8 and x.shape == (9, 3, 8, 8)
        assert torch.equal(x, torch.from_numpy(expected[split][0]))
        assert y.tolist() == expected[split][1] and classes == ["ant", "bee", "cat"]
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 2 and not list(cache.glob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(folder_mod, "decode_all", boom)
    x2, y2, c2 = load_folder_cached(tmp_path / "data", "train", cache)
    assert torch.equal(x2, torch.from_numpy(expected["train"][0])) and c2 == classes


def test_cache_invalidated_when_a_file_changes(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    load_folder_cached(tmp_path / "data", "train", cache)
    first = sorted(cache.glob("*.npz"))
    target = tmp_path / "data" / "train" / "bee" / "img1.png"
    new = np.full((8, 8, 3), 77, np.uint8)
    Image.fromarray(new).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = []
    real = folder_mod.decode_all
    monkeypatch.setattr(folder_mod, "decode_all", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, _, _ = load_folder_cached(tmp_path / "data", "train", cache)
    assert calls == [1]
    assert (x[4] == 77).all()
    after = sorted(cache.glob("*.npz"))
    assert len(after) == 1 and after != first  # the stale cache was replaced
    # adding a file also invalidates
    Image.fromarray(new).save(tmp_path / "data" / "train" / "cat" / "img9.png")
    x, y, _ = load_folder_cached(tmp_path / "data", "train", cache)
    assert calls == [1, 1] and len(x) == 10


def test_cache_invalidated_by_mtime_when_size_is_unchanged(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    target = tmp_path / "train" / "a" / "x.bmp"  # uncompressed: same size whatever the pixels
    Image.fromarray(np.full((4, 4, 3), 10, np.uint8)).save(target)
    size = target.stat().st_size
    x, _, _ = load_folder_cached(tmp_path, "train", tmp_path / "cache")
    Image.fromarray(np.full((4, 4, 3), 99, np.uint8)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert target.stat().st_size == size
    x, _, _ = load_folder_cached(tmp_path, "train", tmp_path / "cache")
    assert (x == 99).all()


def test_cached_requires_one_size(tmp_path):
    make_folder(tmp_path)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(tmp_path / "train" / "cat" / "odd.png")
    with pytest.raises(ValueError, match="same size"):
        load_folder_cached(tmp_path, "train", tmp_path / "cache")


def test_pool_decoding_matches_serial(tmp_path, monkeypatch):
    expected = make_folder(tmp_path, n=4)
    paths, _, _ = scan_folder(tmp_path, "train")
    monkeypatch.setattr(folder_mod, "_POOL_MIN_IMAGES", 1)
    assert np.array_equal(folder_mod.decode_all(paths, workers=2)[0], expected["train"][0])


def test_grey_and_rgba_images_become_rgb(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 90, np.uint8), "L").save(tmp_path / "train" / "a" / "g.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 40, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "train" / "a" / "h.png")
    x, _, _ = load_folder_cached(tmp_path, "train", tmp_path / "cache")
    assert x.shape == (2, 3, 4, 4) and (x[0] == 90).all() and (x[1] == 40).all()


def test_folder_stream_resizes_to_uint8_chw(tmp_path):
    make_folder(tmp_path, size=20)
    jpg = tmp_path / "train" / "ant" / "photo.jpg"
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(jpg, quality=95)
    ds = FolderStream(tmp_path, "train", size=16)
    assert len(ds) == 10 and ds.classes == ["ant", "bee", "cat"]
    x, y = ds[3]  # ant/photo.jpg sorts after img0..2.png
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0
    assert (x.int() - 200).abs().max() <= 3
    sub = ds.select(torch.tensor([9, 0]))
    assert len(sub) == 2 and sub.labels.tolist() == [2, 0] and len(ds) == 10


def test_stream_loader_over_folder_with_workers(tmp_path):
    make_folder(tmp_path, n=4, size=12)
    ds = FolderStream(tmp_path, "train", size=12)
    loader = StreamLoader(ds, 5, train=True, seed=3, num_workers=1)
    full = [(x.clone(), y.clone()) for x, y in loader.epoch(2)]
    assert len(full) == len(loader) == 2
    resumed = list(loader.epoch(2, start_batch=1))
    assert torch.equal(resumed[0][0], full[1][0]) and torch.equal(resumed[0][1], full[1][1])
    again = [x for x, _ in loader.epoch(2)]
    assert all(torch.equal(a, b[0]) for a, b in zip(again, full))


def test_build_data_folder_small_is_cached_on_device(tmp_path):
    make_folder(tmp_path / "data", n=4)
    data = build_data({"name": "folder", "root": str(tmp_path / "data"), "batch_size": 4,
                       "test_batch_size": 5, "cache_dir": str(tmp_path / "cache")}, "cpu", seed=0)
    assert data.num_classes == 3 and data.input_size == 8 and data.classes == ["ant", "bee", "cat"]
    assert len(data.train) == 3 and data.train.images.shape == (12, 3, 8, 8)
    assert [len(y) for _, y in data.test] == [5, 5, 2] and list((tmp_path / "cache").glob("*.npz"))


def test_build_data_folder_large_streams(tmp_path):
    make_folder(tmp_path, n=2, size=70)  # > 64 px: streamed like ImageNet
    data = build_data({"name": "folder", "root": str(tmp_path), "batch_size": 2, "workers": 0,
                       "image_size": 56}, "cpu", seed=0)
    assert isinstance(data.train, StreamLoader) and data.input_size == 56
    x, y = next(data.train.epoch(0))
    assert x.shape == (2, 3, 56, 56) and x.dtype == torch.float32
    x, y = next(iter(data.test))
    assert x.shape == (6, 3, 56, 56) and y.tolist() == [0, 0, 1, 1, 2, 2]


def _extract_sample(tar_path: Path, dest: Path, per_class: int) -> int:
    keep = {f"{i:04d}.jpg" for i in range(per_class)}

    def wanted(m: tarfile.TarInfo) -> bool:
        parts = m.name.split("/")
        return m.isfile() and len(parts) == 3 and parts[0] in ("train", "test") \
            and parts[2] in keep

    with tarfile.open(tar_path) as tar:
        members = [m for m in tar if wanted(m)]
        tar.extractall(dest, members=members, filter="data")
    return len(members)


@pytest.mark.skipif(not CIFAR_JPG.is_file(),
                    reason=f"real CIFAR-10 JPEG folder not available at {CIFAR_JPG} "
                           "(only present on the project's build machine)")
def test_real_cifar10_jpegs_through_the_folder_path(tmp_path):
    assert _extract_sample(CIFAR_JPG, tmp_path / "c10", per_class=20) == 400
    cache = tmp_path / "cache"
    x, y, classes = load_folder_cached(tmp_path / "c10", "train", cache)
    assert x.shape == (200, 3, 32, 32) and classes == CIFAR10_CLASSES
    assert torch.bincount(y).tolist() == [20] * 10
    mean = x.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.49, 0.48, 0.45]), atol=0.05), mean
    xt, yt, ct = load_folder_cached(tmp_path / "c10", "test", cache)
    assert xt.shape == (200, 3, 32, 32) and ct == CIFAR10_CLASSES


@pytest.mark.parametrize("workers", [1, 2])
def test_decoding_a_folder_reports_progress_for_every_image(tmp_path, monkeypatch, workers):
    """Issue 28: the decode before training is not silent (a bar or a line per interval)."""
    make_folder(tmp_path, n=4)
    paths = sorted(str(p) for p in (tmp_path / "train").rglob("*.png"))
    counted: list[int] = []

    class Recorder:
        def __init__(self, total, what, **kw):
            assert (total, what) == (len(paths), "decoding images")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            counted.append(n)

    monkeypatch.setattr(folder_mod, "Progress", Recorder)
    monkeypatch.setattr(folder_mod, "_POOL_MIN_IMAGES", 1)
    images, kept = folder_mod.decode_all(paths, workers=workers)
    assert sum(counted) == len(paths) == len(kept) == len(images)
