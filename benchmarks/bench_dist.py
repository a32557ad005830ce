"""Several processes against one: images/s of ``dml`` and ``dcm`` in one process with T threads
against T processes of one thread each (torchrun, gloo on CPU / NCCL on GPUs), data-parallel
and network-parallel, and the bytes each step exchanges, computed and measured.

Every configuration runs the library's own step (:class:`~dcmkd.engine.loop.Step`, the
method's ``begin_step``/``training_step``, DDP wrappers or the logit all-gather of
:mod:`dcmkd.engine.distributed`) on random CIFAR-sized batches of the same *global* size.
Configurations alternate over ``--rounds`` rounds and each figure is the median, so a machine
whose speed drifts slows them alike.

Bytes per step: *measured* is what the library hands to the collectives (DDP's gradient
buckets through a counting communication hook; the stacked logits of the all-gather), per rank;
*computed* is 4 bytes × the trainable parameters of a rank's networks (the gradient all-reduce)
against 4 bytes × classifiers × batch × classes per network (the logit all-gather).

    python benchmarks/bench_dist.py --archs resnet20 --methods dml,dcm --batch 64 --steps 8
    python benchmarks/bench_dist.py --device cuda --nproc 4          # on a machine with 4 GPUs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, md_table, pick_device, sync, write_results  # noqa: E402

from dcmkd.engine import distributed  # noqa: E402
from dcmkd.engine.device import Precision  # noqa: E402
from dcmkd.engine.loop import Meter, Step, distribute_method  # noqa: E402
from dcmkd.engine.settings import TrainSettings  # noqa: E402
from dcmkd.methods import Schedule, SGDSettings, create_method  # noqa: E402

NUM_CLASSES = 100
#: models whose exchange is computed (not run): the paper's largest CIFAR pair, and ImageNet's
COMPUTED_PAIRS = {"wrn28_10": 32, "resnet50": 224}


def exchange_bytes(method_name: str, arch: str, batch: int) -> dict[str, int]:
    """Bytes a rank hands to the collectives per step: the gradient all-reduce of its networks
    (data-parallel) against the all-gather of one network's stacked logits (network-parallel,
    each rank a network)."""
    with torch.device("meta"):
        method = create_method(method_name, [arch, arch], NUM_CLASSES)
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    classifiers = method.networks[0].num_classifiers
    return {"data_parallel_allreduce": 4 * params,
            "network_parallel_allgather": 4 * classifiers * batch * NUM_CLASSES,
            "parameters": params, "classifiers": classifiers}


def measure(method_name: str, arch: str, batch: int, steps: int, warmup: int, device: str,
            mode: str | None) -> dict:
    """Median step time of the library's step; ``mode``: None (one process), data or
    networks (under torchrun)."""
    ctx = distributed.context(mode or "data", 2, device) if mode else None
    dev = pick_device(distributed.device_of(ctx, device))
    torch.manual_seed(0)
    method = create_method(method_name, [arch, arch], NUM_CLASSES).to(dev)
    settings = TrainSettings(parallel=mode or "data", device=str(dev))
    allreduce = distribute_method(method, ctx, settings, dev) if ctx is not None else False
    method.configure_optimization(SGDSettings(weight_decay=5e-4),
                                  Schedule("constant", lr=0.05, epochs=1))
    precision = Precision("fp32", dev)
    step = Step(method, precision, None, ctx if allreduce else None)
    meter = Meter(dev, [n.classifier_names for n in method.networks], 0)
    local = batch // ctx.replicas if ctx is not None else batch
    x = torch.randn(local, 3, 32, 32, device=dev)
    y = torch.randint(0, NUM_CLASSES, (local,), device=dev)
    method.train()
    times = []
    for i in range(warmup + steps):
        if ctx is not None:
            ctx.barrier()
            if i == warmup:
                ctx.bytes_sent.update(all_reduce=0, all_gather=0)
        sync(dev)
        t0 = time.perf_counter()
        method.begin_step(0.0)
        meter.add(method.training_step(x, y, step, precision.autocast), y)
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    measured = 0.0
    if ctx is not None:   # the slowest rank sets the pace (rank 0 writes the row)
        all_times = ctx.gather_to_main(times)
        sent = ctx.gather_to_main(dict(ctx.bytes_sent))
        if not ctx.is_main:
            return {}
        times = [max(t) for t in zip(*all_times)]
        measured = max(s["all_reduce"] + s["all_gather"] for s in sent) / steps
    step_s = statistics.median(times)
    return {"method": method_name, "arch": arch, "mode": mode or "single",
            "processes": ctx.world if ctx else 1, "threads": torch.get_num_threads(),
            "batch": batch, "step_seconds": step_s, "images_per_s": batch / step_s,
            "measured_bytes_per_step": measured}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    row = measure(args.method, args.arch, args.batch, args.steps, args.warmup, args.device,
                  args.child)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(row))
    distributed.shutdown()


def run_child(mode: str, method: str, arch: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={args.nproc}", __file__, "--child", mode, "--method", method,
               "--arch", arch, "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--threads", "1",
               "--out", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        if p.returncode != 0:
            raise RuntimeError(f"{mode} {method} {arch}: {p.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--archs", default="resnet20")
    ap.add_argument("--methods", default="dml,dcm")
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2, help="processes (network-parallel: 2)")
    ap.add_argument("--name", default="bench_dist")
    ap.add_argument("--child", choices=("data", "networks"), help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--arch", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.nproc if args.device == "cpu" else torch.get_num_threads())
    rows = []
    for arch in args.archs.split(","):
        for method in args.methods.split(","):
            runs: dict[str, list[dict]] = {"single": [], "data": [], "networks": []}
            for _ in range(args.rounds):
                runs["single"].append(measure(method, arch, args.batch, args.steps, args.warmup,
                                              args.device, None))
                for mode in ("data", "networks"):
                    runs[mode].append(run_child(mode, method, arch, args))
            computed = exchange_bytes(method, arch, args.batch)
            for mode, rs in runs.items():
                row = dict(rs[0])
                row["step_seconds"] = statistics.median(r["step_seconds"] for r in rs)
                row["images_per_s"] = args.batch / row["step_seconds"]
                row["computed_bytes_per_step"] = {
                    "single": 0, "data": computed["data_parallel_allreduce"],
                    "networks": computed["network_parallel_allgather"]}[mode]
                rows.append(row)
                print(f"{arch} {method} {mode:9s} {row['processes']}×{row['threads']} "
                      f"{row['images_per_s']:8.1f} img/s  bytes/step computed "
                      f"{row['computed_bytes_per_step']:,} measured "
                      f"{row['measured_bytes_per_step']:,.0f}", flush=True)
    computed_rows = [{"arch": a, "method": m, "batch": 128, **exchange_bytes(m, a, 128)}
                     for a in COMPUTED_PAIRS for m in ("dml", "dcm")]
    result = {**environment(torch.device(args.device)), "rows": rows,
              "computed": computed_rows, "timing": f"median of {args.rounds} rounds of "
              f"{args.steps} steps after {args.warmup}"}
    speed = {(r["arch"], r["method"], r["mode"]): r["images_per_s"] for r in rows}
    md = (f"# {args.name}\n\nDevice: {result['device_name']}; global batch {args.batch}; "
          f"{result['timing']}.\n\n"
          + md_table(["arch", "method", "mode", "processes × threads", "images/s",
                      "vs one process", "bytes/step computed", "bytes/step measured"],
                     [[r["arch"], r["method"], r["mode"], f"{r['processes']}×{r['threads']}",
                       r["images_per_s"],
                       r["images_per_s"] / speed[(r["arch"], r["method"], "single")],
                       f"{r['computed_bytes_per_step']:,}",
                       f"{r['measured_bytes_per_step']:,.0f}"] for r in rows])
          + "\nComputed for larger pairs (batch 128, 100 classes), bytes per rank and step:\n\n"
          + md_table(["pair", "method", "parameters", "data-parallel all-reduce",
                      "network-parallel all-gather", "ratio"],
                     [[f"{r['arch']} ×2", r["method"], f"{r['parameters']:,}",
                       f"{r['data_parallel_allreduce']:,}",
                       f"{r['network_parallel_allgather']:,}",
                       f"{r['data_parallel_allreduce'] / r['network_parallel_allgather']:,.0f}×"]
                      for r in computed_rows])
          + f"\nCommand: `{result['command']}`\n")
    jpath, mpath = write_results(args.name, result, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")


if __name__ == "__main__":
    main()
