"""A subset of the real CIFAR-10 images small enough to travel to a lent GPU machine (under
64 MiB with the repository): every test image and ``--per-class`` training images per class,
extracted from ``../shared/data/cifar10-jpg.tar`` into ``.device-data/cifar10`` (ignored by git
through ``.git/info/exclude``; pass ``.device-data`` in the device tool's ``carry``).

    python benchmarks/device_data.py --per-class 2000
"""
from __future__ import annotations

import argparse
import tarfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tar", default=str(ROOT.parent / "shared/data/cifar10-jpg.tar"))
    ap.add_argument("--out", default=str(ROOT / ".device-data/cifar10"))
    ap.add_argument("--per-class", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.out)
    kept: Counter = Counter()
    with tarfile.open(args.tar) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3 or parts[-3] not in ("train", "test"):
                continue
            split, cls = parts[-3], parts[-2]
            if split == "train" and kept[cls] >= args.per_class:
                continue
            kept[cls] += split == "train"
            target = out / split / cls / parts[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    exclude = ROOT / ".git/info/exclude"
    if exclude.is_file() and "/.device-data/" not in exclude.read_text():
        with open(exclude, "a") as f:
            f.write("/.device-data/\n")
    print(f"{out}: {sum(kept.values())} training images in {len(kept)} classes, and the test set")


if __name__ == "__main__":
    main()
