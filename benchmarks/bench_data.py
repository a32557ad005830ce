"""Training-data throughput: on-device batch augmentation vs a per-sample PIL pipeline.

Library path: ``dcmkd.data.DeviceLoader`` (uint8 dataset on the device, whole-batch pad-4
random crop + horizontal flip via ``dcmkd.data.augment.cifar_train``, then normalisation).

Reference: the pipeline common in public KD code: a map-style ``Dataset`` that turns each stored
HWC uint8 array into a PIL image, pads it by 4, crops a random 32x32 window, flips it with
probability 1/2, converts to a float CHW tensor on the 0..1 scale and normalises it (PIL and
numpy only), batched by ``torch.utils.data.DataLoader`` with worker processes; batches are then
moved to the device (what a training loop would do).

Both read the same images in the same run: a subset of the real CIFAR-10 training images from
``../shared/data/cifar10-jpg.tar`` (extracted into a temporary folder, decoded with
``dcmkd.data.load_folder_cached``) when the archive exists, else synthetic uint8 images.

    python benchmarks/bench_data.py --images 10000 --device cpu
"""
from __future__ import annotations

import argparse
import random
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, md_table, pick_device, sync, write_results  # noqa: E402

from dcmkd.data import DeviceLoader, load_folder_cached  # noqa: E402
from dcmkd.data.augment import CIFAR10_MEAN, CIFAR10_STD, cifar_train  # noqa: E402

DEFAULT_TAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar"


# ----------------------------------------------------------------------------- data

def extract_subset(tar_path: Path, dest: Path, n: int) -> None:
    """Extract about ``n`` training images (equally many per class) from the image-folder tar."""
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/")
                   and m.name.lower().endswith((".jpg", ".jpeg", ".png"))]
        by_class: dict[str, list] = defaultdict(list)
        for m in members:
            by_class[m.name.split("/")[1]].append(m)
        per_class = max(1, n // max(1, len(by_class)))
        chosen = [m for ms in by_class.values() for m in sorted(ms, key=lambda m: m.name)[:per_class]]
        for m in chosen:
            tar.extract(m, dest, filter="data")


def load_images(n: int, tar_path: Path, tmp: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    if tar_path.is_file():
        extract_subset(tar_path, tmp / "cifar10", n)
        images, labels, _ = load_folder_cached(tmp / "cifar10", "train", cache_dir=tmp / "cache")
        return images, labels, f"real CIFAR-10 JPEG subset from {tar_path}"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels, "synthetic uint8 32x32 (archive not found)"


# ----------------------------------------------------------------------------- reference pipeline

class PerSampleCifar(Dataset):
    """Per-sample augmentation in the usual public style, with PIL and numpy only."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, mean, std, padding: int = 4):
        self.images, self.labels, self.padding = images_hwc, labels, padding
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image, ImageOps
        img = Image.fromarray(self.images[i])                         # stored HWC uint8 -> PIL
        w, h = img.size
        p = self.padding
        img = ImageOps.expand(img, border=p, fill=0)                   # zero pad
        top, left = random.randint(0, 2 * p), random.randint(0, 2 * p)
        img = img.crop((left, top, left + w, top + h))                 # random crop
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)       # random flip
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0   # "ToTensor"
        arr = (arr - self.mean) / self.std                             # "Normalize"
        return torch.from_numpy(np.ascontiguousarray(arr)), int(self.labels[i])


def _seed_worker(worker_id: int) -> None:
    random.seed(torch.initial_seed() % 2**32)


# ----------------------------------------------------------------------------- timing

def time_epochs(make_iter, epochs: int, device: torch.device) -> tuple[float, int]:
    """Seconds and images for ``epochs`` full passes (each batch touched on the device)."""
    n = 0
    sync(device)
    t0 = time.perf_counter()
    for e in range(epochs):
        for x, y in make_iter(e):
            n += x.shape[0]
    sync(device)
    return time.perf_counter() - t0, n


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=10000, help="training images to use")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:0 or auto")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    ap.add_argument("--epochs", type=int, default=2, help="timed passes (after one warm-up pass)")
    ap.add_argument("--tar", type=Path, default=DEFAULT_TAR)
    args = ap.parse_args(argv)
    device = pick_device(args.device)

    with tempfile.TemporaryDirectory(prefix="dcmkd-bench-data-") as tmp:
        t0 = time.perf_counter()
        images, labels, source = load_images(args.images, args.tar, Path(tmp))
        prep_s = time.perf_counter() - t0
    n = len(images)
    print(f"{n} images ({source}), prepared in {prep_s:.1f}s; device {device}", flush=True)

    # library: whole dataset on the device, batch augmentation
    loader = DeviceLoader(images, labels, args.batch, train=True, device=device, seed=0,
                          augment=cifar_train, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    time_epochs(lambda e: loader.epoch(100 + e), 1, device)              # warm-up
    lib_s, lib_n = time_epochs(lambda e: loader.epoch(e), args.epochs, device)

    # reference: per-sample PIL pipeline through DataLoader workers
    ds = PerSampleCifar(images.permute(0, 2, 3, 1).contiguous().numpy(), labels.numpy(),
                        CIFAR10_MEAN, CIFAR10_STD)
    dl = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True,
                    num_workers=args.workers, persistent_workers=args.workers > 0,
                    pin_memory=device.type == "cuda", worker_init_fn=_seed_worker)
    nb = device.type == "cuda"

    def ref_iter(_e):
        for x, y in dl:
            yield x.to(device, non_blocking=nb), y.to(device, non_blocking=nb)

    t0 = time.perf_counter()
    time_epochs(ref_iter, 1, device)                                     # warm-up (starts workers)
    ref_warm_s = time.perf_counter() - t0
    ref_s, ref_n = time_epochs(ref_iter, args.epochs, device)

    lib_ips, ref_ips = lib_n / lib_s, ref_n / ref_s
    result = {
        **environment(device),
        "data": source,
        "images": n,
        "batch": args.batch,
        "timed_epochs": args.epochs,
        "reference_workers": args.workers,
        "library": {"name": "DeviceLoader + cifar_train + normalize", "images_per_s": lib_ips,
                    "seconds": lib_s, "images_timed": lib_n},
        "reference": {"name": f"per-sample PIL/numpy Dataset + DataLoader(num_workers={args.workers})",
                      "images_per_s": ref_ips, "seconds": ref_s, "images_timed": ref_n,
                      "warmup_epoch_seconds_incl_worker_start": ref_warm_s},
        "speedup_library_over_reference": lib_ips / ref_ips,
    }
    md = (f"# bench_data\n\nDevice: {result['device_name']} ({device}); torch {torch.__version__}\n\n"
          f"Data: {source}; {n} images; batch {args.batch}; {args.epochs} timed epoch(s) after "
          f"one warm-up epoch.\n\n"
          + md_table(["pipeline", "images/s", "seconds"],
                     [[result["library"]["name"], lib_ips, lib_s],
                      [result["reference"]["name"], ref_ips, ref_s]])
          + f"\nSpeed-up (library / reference): **{lib_ips / ref_ips:.2f}x**\n\n"
          f"Command: `{result['command']}`\n")
    jpath, mpath = write_results("bench_data", result, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")
    return result


if __name__ == "__main__":
    main()
