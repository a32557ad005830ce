"""Training-step throughput of ``ind`` (one network), ``dml`` and ``dcm``.

For each network pair (ResNet-20, optionally ResNet-110) and memory layout (default and
channels_last) it builds the method with ``dcmkd.methods.create_method(name, nets,
num_classes=100)``, runs ``method.training_step(x, y, step)`` with an SGD ``step`` (zero_grad with
set_to_none, backward, opt.step) on random fp32 CIFAR-sized batches and reports:

- images/s over ``--steps`` timed steps after ``--warmup`` steps;
- forward+backward FLOPs per image (``torch.utils.flop_counter.FlopCounterMode`` around one
  step) and the achieved GFLOP/s;
- peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's max RSS
  (``ru_maxrss``), a whole-process high-water mark that never goes down (so later rows include
  earlier ones), not a per-configuration figure.

Derived figures, each with a pass/fail flag: dml/ind step time (target <= 2.1), (dcm/dml time
ratio) / (dcm/dml FLOP ratio) (target 0.9..1.1) and channels_last / default speed (target >= 1).

    python benchmarks/bench_step.py --pairs resnet20,resnet110 --batch 128 --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, max_rss_mib, md_table, pick_device, sync, write_results  # noqa: E402

from dcmkd.methods import create_method  # noqa: E402

METHODS = ("ind", "dml", "dcm")
LAYOUTS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}


def nets_for(method: str, arch: str) -> list[str]:
    return [arch] if method == "ind" else [arch, arch]


def measure(method_name: str, arch: str, layout: str, batch: int, steps: int, warmup: int,
            device: torch.device, num_classes: int = 100) -> dict:
    torch.manual_seed(0)
    fmt = LAYOUTS[layout]
    method = create_method(method_name, nets_for(method_name, arch), num_classes=num_classes)
    method = method.to(device)
    if fmt is not torch.contiguous_format:
        method = method.to(memory_format=fmt)
    method.train()
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05,
                          momentum=0.9, weight_decay=5e-4)

    def step(loss, terms=None):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        method.training_step(x, y, step)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        method.training_step(x, y, step)
    sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mib, peak_kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak_mib, peak_kind = max_rss_mib(), "process_max_rss"

    counter = FlopCounterMode(display=False)
    with counter:
        method.training_step(x, y, step)
    flops = counter.get_total_flops()

    step_s = seconds / steps
    return {
        "method": method_name, "arch": arch, "layout": layout, "networks": len(method.networks),
        "batch": batch, "steps": steps, "warmup": warmup,
        "step_seconds": step_s, "images_per_s": batch / step_s,
        "flops_per_image": flops / batch, "gflops_per_s": flops / step_s / 1e9,
        "peak_memory_mib": peak_mib, "peak_memory_kind": peak_kind,
    }


def derive(rows: list[dict]) -> list[dict]:
    by = {(r["arch"], r["layout"], r["method"]): r for r in rows}
    out = []
    for arch in sorted({r["arch"] for r in rows}):
        for layout in LAYOUTS:
            ind, dml, dcm = (by.get((arch, layout, m)) for m in METHODS)
            if ind and dml:
                v = dml["step_seconds"] / ind["step_seconds"]
                out.append({"figure": "dml_step_time / ind_step_time", "arch": arch,
                            "layout": layout, "value": v, "target": "<= 2.1", "pass": v <= 2.1})
            if dml and dcm:
                t = dcm["step_seconds"] / dml["step_seconds"]
                f = dcm["flops_per_image"] / dml["flops_per_image"]
                v = t / f
                out.append({"figure": "(dcm/dml time) / (dcm/dml FLOPs)", "arch": arch,
                            "layout": layout, "value": v, "time_ratio": t, "flop_ratio": f,
                            "target": "0.9..1.1", "pass": 0.9 <= v <= 1.1})
        for m in METHODS:
            d, c = by.get((arch, "default", m)), by.get((arch, "channels_last", m))
            if d and c:
                v = c["images_per_s"] / d["images_per_s"]
                out.append({"figure": f"channels_last / default speed ({m})", "arch": arch,
                            "layout": "both", "value": v, "target": ">= 1", "pass": v >= 1.0})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:0 or auto")
    ap.add_argument("--pairs", default=None,
                    help="comma-separated architectures (default: resnet20 on CPU, "
                         "resnet20,resnet110 on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="default 128 (CUDA) / 64 (CPU)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    pairs = (args.pairs or ("resnet20,resnet110" if cuda else "resnet20")).split(",")
    batch = args.batch or (128 if cuda else 64)
    if cuda:
        torch.backends.cudnn.benchmark = True

    rows = []
    for arch in pairs:
        for layout in args.layouts.split(","):
            for m in args.methods.split(","):
                r = measure(m, arch, layout, batch, args.steps, args.warmup, device)
                rows.append(r)
                print(f"{arch:10s} {layout:13s} {m:4s} {r['images_per_s']:9.1f} img/s "
                      f"{r['step_seconds'] * 1e3:8.1f} ms/step {r['flops_per_image'] / 1e6:8.1f} "
                      f"MFLOP/img {r['gflops_per_s']:7.1f} GFLOP/s "
                      f"peak {r['peak_memory_mib']:.0f} MiB", flush=True)
    derived = derive(rows)
    result = {**environment(device), "fp32": True, "batch": batch, "pairs": pairs,
              "memory_note": ("torch.cuda.max_memory_allocated per configuration" if cuda else
                              "CPU: process max RSS (ru_maxrss), a monotone whole-process "
                              "high-water mark, not per configuration"),
              "rows": rows, "derived": derived,
              "all_pass": all(d["pass"] for d in derived)}
    md = (f"# bench_step\n\nDevice: {result['device_name']} ({device}); torch {torch.__version__}; "
          f"fp32; batch {batch}; {args.steps} timed steps after {args.warmup} warm-up.\n\n"
          + md_table(["arch", "layout", "method", "images/s", "ms/step", "MFLOP/img (fwd+bwd)",
                      "GFLOP/s", "peak MiB"],
                     [[r["arch"], r["layout"], r["method"], r["images_per_s"],
                       r["step_seconds"] * 1e3, r["flops_per_image"] / 1e6, r["gflops_per_s"],
                       r["peak_memory_mib"]] for r in rows])
          + f"\nPeak memory: {result['memory_note']}.\n\n"
          + md_table(["figure", "arch", "layout", "value", "target", "pass"],
                     [[d["figure"], d["arch"], d["layout"], round(d["value"], 3), d["target"],
                       "PASS" if d["pass"] else "FAIL"] for d in derived])
          + f"\nCommand: `{result['command']}`\n")
    jpath, mpath = write_results("bench_step", result, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")
    return result


if __name__ == "__main__":
    main()
