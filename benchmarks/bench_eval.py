"""Test-set evaluation throughput by batch size: what ``data.test_batch_size`` defaults to.

Library path: :func:`dcmkd.engine.loop.evaluate` (every classifier of every network, top-1 and
top-5 counted on the device) over a :class:`dcmkd.data.DeviceLoader` of ``--images`` synthetic
CIFAR-sized uint8 test images, for ``ind`` (one network) and ``dcm`` (two networks with their
auxiliary classifiers), at each batch size of ``--batches``. Reference: batch 512, the usual
GPU choice and the library's former default on every device. Timed **interleaved**: each round
evaluates every (method, batch size) once; a figure is the median over rounds, so a machine
whose speed drifts slows every configuration alike.

On the CPU, a large batch makes every layer's activations (512 × 16 × 32 × 32 floats = 32 MiB
for a ResNet's first stage) overflow the caches, and the forward pass runs at memory speed;
``DataConfig`` picks the default from this benchmark's figures.

    python benchmarks/bench_eval.py --device cpu --images 1024 --rounds 3
    python benchmarks/bench_eval.py --device cpu --threads 1 --name bench_eval_cpu_1thread
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, md_table, pick_device, sync, write_results  # noqa: E402

from dcmkd.data import DeviceLoader  # noqa: E402
from dcmkd.data.build import default_test_batch_size, synthetic_split  # noqa: E402
from dcmkd.engine.device import Precision  # noqa: E402
from dcmkd.engine.loop import evaluate  # noqa: E402
from dcmkd.engine.settings import TrainSettings  # noqa: E402
from dcmkd.methods import create_method  # noqa: E402

REFERENCE_BATCH = 512


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--methods", default="ind,dcm")
    p.add_argument("--batches", default="32,64,128,256,512")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--name", default="", help="results stem (default bench_eval_<device>)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = synthetic_split(args.images, 32, 10, seed=1)
    sizes = sorted({int(b) for b in args.batches.split(",")} | {REFERENCE_BATCH})
    loaders = {b: DeviceLoader(x, y, b, train=False, device=device, seed=0,
                               mean=(0.5,) * 3, std=(0.289,) * 3) for b in sizes}
    settings, precision = TrainSettings(), Precision("fp32", device)
    methods = {}
    for name in args.methods.split(","):
        nets = [args.arch] * (2 if name in ("dml", "dcm", "ds") else 1)
        methods[name] = create_method(name, nets, num_classes=10).to(device)
    for method in methods.values():   # warm-up: one small evaluation each
        evaluate(method, DeviceLoader(x[:64], y[:64], 64, train=False, device=device, seed=0),
                 device, precision, settings)
    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in methods for b in sizes}
    for _ in range(args.rounds):
        for (name, b), record in times.items():
            sync(device)
            t0 = time.perf_counter()
            evaluate(methods[name], loaders[b], device, precision, settings)
            sync(device)
            record.append(time.perf_counter() - t0)
    rows = []
    for name in methods:
        ref = statistics.median(times[(name, REFERENCE_BATCH)])
        for b in sizes:
            t = statistics.median(times[(name, b)])
            rows.append({"method": name, "arch": args.arch, "batch": b,
                         "ms_per_image": 1e3 * t / args.images,
                         "images_per_s": args.images / t, "speedup_vs_512": ref / t})
    default = default_test_batch_size(device)
    data = {"environment": environment(device), "images": args.images, "rounds": args.rounds,
            "reference_batch": REFERENCE_BATCH, "library_default": default, "rows": rows}
    table = md_table(["method", "batch", "ms/image", "images/s", "speed vs 512"],
                     [[r["method"], r["batch"], r["ms_per_image"], r["images_per_s"],
                       r["speedup_vs_512"]] for r in rows])
    md = (f"# Evaluation throughput by test batch size\n\n{data['environment']['device_name']}, "
          f"{args.arch}, {args.images} images, median of {args.rounds} interleaved rounds; the "
          f"library's default on this device: {default}.\n\n{table}")
    jpath, _ = write_results(args.name or f"bench_eval_{device.type}", data, md)
    print(md + f"\n→ {jpath}")
    return data


if __name__ == "__main__":
    main()
