"""Training-step throughput of ``ind`` (one network), ``dml`` and ``dcm``, and what coupling costs.

For each architecture (ResNet-20 and ResNet-110 by default) and memory layout (default and
channels_last) it builds, with ``dcmkd.methods.create_method(name, nets, num_classes=100)``:

- ``ind``: one network, the unit of cost;
- ``dml``: two networks coupled at their final classifiers;
- ``ds``: the two multi-exit networks of DCM (backbone + C2 + C3 each) with cross-entropy on
  every classifier and *no* links between them: DCM's networks without its coupling;
- ``dcm``: the same networks with the dense two-way links (DCM Eq. 6-9).

Each runs the library's own training step, as :func:`dcmkd.fit` does: ``method.begin_step``,
``method.training_step(x, y, step, autocast)`` with the loop's :class:`~dcmkd.engine.loop.Step`
(zero_grad, backward outside autocast, SGD step) and the loop's device-side
:class:`~dcmkd.engine.loop.Meter` accumulating every loss and accuracy, on random CIFAR-sized
batches. ``--compile`` adds a ``+compile`` row for ``ind``, ``dml`` and ``dcm``: the same step
with the networks through ``torch.compile`` (``compile=true``), with its one-off compile time.
``host reads/step`` counts ``item``/``tolist``/``float``/``int``/``bool`` calls on tensors
during the timed steps (the loop reads once per ``log_every`` steps, outside this count). The methods are timed **interleaved**: every round
runs one step of each, and a method's time is the median over rounds. A shared or noisy machine
(a 2-core VM, a GPU with neighbours) then slows all methods alike, and the ratios, which are
what the targets are about, stay meaningful.

Figures per configuration: images/s, forward+backward FLOPs per image (torch's
``FlopCounterMode`` around one step), achieved GFLOP/s, and peak memory of a separate process
that builds only that method and runs two steps (CPU: growth of the process's peak RSS; CUDA:
``torch.cuda.max_memory_allocated``), so each figure is that method's own.

Derived figures, each with its target (the issue's) and pass/fail:

- ``dml / ind`` step time <= 2.1: coupling two networks costs nothing beyond the second network;
- ``(dcm/dml time) / (dcm/dml FLOPs)`` in 0.9..1.1: DCM costs what its FLOPs say, compared with
  DML. Below 0.9 means DCM's extra FLOPs (wide auxiliary branches) run at a higher FLOP rate
  than the backbones, not that something is wrong; the next figure isolates the coupling;
- ``dcm / ds`` step time <= 1.1: the dense links cost nothing beyond the networks they link;
- ``channels_last / default`` speed >= 1;
- ``compiled / eager`` speed of a ``dcm`` step >= 1.15 (with ``--compile``).

    python benchmarks/bench_step.py --device cpu --batch 128 --rounds 10
    python benchmarks/bench_step.py --device cuda --batch 128 --rounds 50

``--layouts-per-family`` measures instead the default layout against channels_last for one
small representative network per zoo family (:data:`FAMILY_MODELS`; the family is
:func:`dcmkd.engine.layout.family_of`, the recipe family of ``engine/config.py``), the two
layouts interleaved within every round (their order alternating between rounds), one intra-op
thread by default (``--threads``) and the load average recorded before and after each network,
since a shared machine's other jobs move the absolute times. It writes
``benchmarks/results/bench_layout_<device type>.md/.json``, the source of the table in
:mod:`dcmkd.engine.layout`:

    python benchmarks/bench_step.py --layouts-per-family --device cpu
    python benchmarks/bench_step.py --layouts-per-family --device cuda --precision bf16 --batch 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (environment, md_table, peak_rss_mib, pick_device, reset_peak_rss,  # noqa: E402
                     sync, write_results)

from dcmkd.engine.device import Precision, compile_networks  # noqa: E402
from dcmkd.engine.layout import family_of  # noqa: E402
from dcmkd.engine.loop import Meter, Step  # noqa: E402
from dcmkd.methods import Schedule, SGDSettings, create_method  # noqa: E402

METHODS = ("ind", "dml", "ds", "dcm")
COMPILED = ("ind", "dml", "dcm")   # the methods timed with compile=true too
READS = ("item", "tolist", "__float__", "__int__", "__bool__")
LAYOUTS = {"default": torch.contiguous_format, "channels_last": torch.channels_last}
NUM_CLASSES = 100
# --layouts-per-family: (network, input side) for one small network per zoo family, plus the
# zoo's other CIFAR networks that family_of counts as "cifar_resnet" (VGG-16-BN, MobileNet):
# CIFAR families at 32 px, ImageNet families at 64 px to keep the CPU run short.
FAMILY_MODELS = (("resnet20", 32), ("vgg16_bn", 32), ("mobilenet", 32), ("wrn16_2", 32),
                 ("densenet40_12", 32), ("mobilenetv2", 64), ("resnet18", 64))
# A speed ratio within 1 ± TIE is a tie: on the shared 2-core CPU the ratio of one round's two
# steps has an interquartile range of about ±3 % around its median, and the median of 12-20
# rounds moves by about 1.5 % between runs.
TIE = 0.03


class Built:
    """A method on ``device`` in ``layout``, with the loop's step and meter and one batch."""

    def __init__(self, name: str, arch: str, layout: str, batch: int, device: torch.device,
                 precision: str = "fp32", size: int = 32):
        torch.manual_seed(0)
        base, compiled = name.removesuffix("+compile"), name.endswith("+compile")
        fmt = LAYOUTS[layout]
        nets = [arch] if base == "ind" else [arch, arch]
        self.method = create_method(base, nets, num_classes=NUM_CLASSES).to(device)
        if fmt is not torch.contiguous_format:
            self.method = self.method.to(memory_format=fmt)
        self.method.train()
        self.method.configure_optimization(SGDSettings(weight_decay=5e-4),
                                           Schedule("constant", lr=0.05, epochs=1))
        self.precision = Precision(precision, device)
        self.step = Step(self.method, self.precision, None)
        self.meter = Meter(device, [n.classifier_names for n in self.method.networks], 0)
        if compiled:
            compile_networks(self.method.networks, print)
        self.x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def __call__(self) -> None:
        """One training step, as the loop runs it."""
        self.method.begin_step(0.0)
        out = self.method.training_step(self.x, self.y, self.step, self.precision.autocast)
        self.meter.add(out, self.y)


def build(method_name: str, arch: str, layout: str, batch: int, device: torch.device,
          precision: str = "fp32", size: int = 32) -> Built:
    return Built(method_name, arch, layout, batch, device, precision, size)


def flops_per_step(built: Built) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        built()
    return counter.get_total_flops()


def host_reads(built: Built, steps: int = 3) -> float:
    """Host reads of tensor values per step (``item``, ``tolist``, ``float``…)."""
    count = [0]
    originals = {n: getattr(torch.Tensor, n) for n in READS}

    def counting(name):
        def wrapper(self, *a, **k):
            count[0] += 1
            return originals[name](self, *a, **k)
        return wrapper

    try:
        for n in READS:
            setattr(torch.Tensor, n, counting(n))
        for _ in range(steps):
            built()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
    return count[0] / steps


def peak_memory_mib(method_name: str, arch: str, layout: str, batch: int,
                    device: torch.device, precision: str) -> float:
    """Peak memory of building ``method_name`` and running two steps, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--memory-of",
                          json.dumps([method_name, arch, layout, batch, str(device), precision])],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(spec: str) -> None:
    method_name, arch, layout, batch, device, precision = json.loads(spec)
    device = torch.device(device)
    before = reset_peak_rss()
    built = build(method_name, arch, layout, batch, device, precision)
    for _ in range(2):
        built()
    sync(device)
    if device.type == "cuda":
        print(torch.cuda.max_memory_allocated(device) / 2**20)
    else:
        print(peak_rss_mib() - before)


def measure(arch: str, layout: str, methods: list[str], batch: int, rounds: int, warmup: int,
            device: torch.device, precision: str = "fp32", memory: bool = True) -> list[dict]:
    """Interleaved timing of ``methods`` on one (arch, layout): median step time over rounds.
    The first step of a ``+compile`` method (tracing and compiling) is timed on its own."""
    built = {m: build(m, arch, layout, batch, device, precision) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    first: dict[str, float] = {}
    for r in range(warmup + rounds):
        for m, b in built.items():
            sync(device)
            t0 = time.perf_counter()
            b()
            sync(device)
            if r == 0:
                first[m] = time.perf_counter() - t0
            if r >= warmup:
                times[m].append(time.perf_counter() - t0)
    rows = []
    for m, b in built.items():
        step_s = statistics.median(times[m])
        flops = flops_per_step(build(m.removesuffix("+compile"), arch, layout, batch, device,
                                     precision))
        rows.append({
            "method": m, "arch": arch, "layout": layout, "precision": precision,
            "networks": len(b.method.networks), "batch": batch, "rounds": rounds,
            "warmup": warmup, "step_seconds": step_s, "step_seconds_all": times[m],
            "images_per_s": batch / step_s, "flops_per_image": flops / batch,
            "gflops_per_s": flops / step_s / 1e9, "host_reads_per_step": host_reads(b),
            "compile_seconds": first[m] - step_s if m.endswith("+compile") else None,
            "peak_memory_mib": peak_memory_mib(m, arch, layout, batch, device, precision)
            if memory else None,
        })
    return rows


def derive(rows: list[dict]) -> list[dict]:
    by = {(r["arch"], r["layout"], r["method"]): r for r in rows}
    out = []

    def add(figure, arch, layout, value, target, ok, **extra):
        out.append({"figure": figure, "arch": arch, "layout": layout, "value": value,
                    "target": target, "pass": bool(ok), **extra})

    for arch in dict.fromkeys(r["arch"] for r in rows):
        for layout in LAYOUTS:
            ind, dml, ds, dcm = (by.get((arch, layout, m)) for m in METHODS)
            if ind and dml:
                v = dml["step_seconds"] / ind["step_seconds"]
                add("dml / ind step time", arch, layout, v, "<= 2.1", v <= 2.1)
            if dml and dcm:
                t = dcm["step_seconds"] / dml["step_seconds"]
                f = dcm["flops_per_image"] / dml["flops_per_image"]
                add("(dcm/dml time) / (dcm/dml FLOPs)", arch, layout, t / f, "0.9..1.1",
                    0.9 <= t / f <= 1.1, time_ratio=t, flop_ratio=f)
            if ds and dcm:
                v = dcm["step_seconds"] / ds["step_seconds"]
                add("dcm / ds step time (cost of the links)", arch, layout, v, "<= 1.1",
                    v <= 1.1)
        for m in METHODS:
            d, c = by.get((arch, "default", m)), by.get((arch, "channels_last", m))
            if d and c:
                v = c["images_per_s"] / d["images_per_s"]
                add(f"channels_last / default speed ({m})", arch, "both", v, ">= 1", v >= 1.0)
        for layout in LAYOUTS:
            for m in COMPILED:
                e, c = by.get((arch, layout, m)), by.get((arch, layout, f"{m}+compile"))
                if e and c:
                    v = c["images_per_s"] / e["images_per_s"]
                    add(f"compiled / eager speed ({m})", arch, layout, v,
                        ">= 1.15" if m == "dcm" else "(none)", v >= 1.15 if m == "dcm" else True)
    return out


def measure_layouts(arch: str, size: int, methods: list[str], batch: int, rounds: int,
                    warmup: int, device: torch.device, precision: str = "fp32") -> list[dict]:
    """Both layouts of ``arch`` for each method, interleaved: every round runs one step of each
    (method, layout), the layouts' order alternating between rounds; a step time is the median
    over rounds. One row per method: ms/step in each layout and the speed ratio
    channels_last / default (> 1: channels_last is faster)."""
    load_before = os.getloadavg()
    built = {(m, lay): build(m, arch, lay, batch, device, precision, size)
             for m in methods for lay in LAYOUTS}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in built}
    for r in range(warmup + rounds):
        for m in methods:
            for lay in (tuple(LAYOUTS) if r % 2 == 0 else tuple(reversed(LAYOUTS))):
                sync(device)
                t0 = time.perf_counter()
                built[m, lay]()
                sync(device)
                if r >= warmup:
                    times[m, lay].append(time.perf_counter() - t0)
    load_after = os.getloadavg()
    rows = []
    for m in methods:
        d, c = (statistics.median(times[m, lay]) for lay in LAYOUTS)
        rows.append({"model": arch, "family": family_of(arch), "size": size, "batch": batch,
                     "method": m, "precision": precision, "default_ms": d * 1e3,
                     "channels_last_ms": c * 1e3, "speed_ratio": d / c,
                     "default_ms_all": [t * 1e3 for t in times[m, "default"]],
                     "channels_last_ms_all": [t * 1e3 for t in times[m, "channels_last"]],
                     "verdict": verdict(d / c),
                     "load_before": list(load_before), "load_after": list(load_after)})
    return rows


def verdict(speed_ratio: float, tie: float = TIE) -> str:
    """``channels_last``, ``default`` (the faster one) or ``tie`` (within ``1 ± tie``)."""
    if abs(speed_ratio - 1.0) <= tie:
        return "tie"
    return "channels_last" if speed_ratio > 1.0 else "default"


def layout_summary(rows: list[dict], tie: float = TIE) -> tuple[dict, dict]:
    """The layout to use per network and per family, from the measured rows.

    A network: ``default`` when one of its rows (a method) ran measurably slower in
    channels_last (speed ratio below ``1 - tie``), else ``channels_last``. A ratio within
    ``1 ± tie`` is a tie, and ties go to channels_last, the layout recommended for GPUs, so
    that one layout serves both (a choice of this project: neither layout is faster there).
    A family: the layout of its representative, the first of its networks in ``rows``; its
    other measured networks that disagree are its ``exceptions`` (the family lookup counts
    the CIFAR VGG-16-BN and MobileNet as ``cifar_resnet``, which they are not).
    Returns ``(networks, families)``, the source of :mod:`dcmkd.engine.layout`'s tables."""
    networks: dict[str, dict] = {}
    for net in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == net]
        ratios = [r["speed_ratio"] for r in mine]
        networks[net] = {"family": mine[0]["family"],
                         "faster": "default" if min(ratios) < 1.0 - tie else "channels_last",
                         "speed_ratio_min": min(ratios), "speed_ratio_max": max(ratios)}
    families: dict[str, dict] = {}
    for net, v in networks.items():
        if v["family"] not in families:
            families[v["family"]] = {"faster": v["faster"], "representative": net,
                                     "speed_ratio_min": v["speed_ratio_min"],
                                     "speed_ratio_max": v["speed_ratio_max"],
                                     "models": [], "exceptions": {}}
        fam = families[v["family"]]
        fam["models"].append(net)
        if v["faster"] != fam["faster"]:
            fam["exceptions"][net] = v["faster"]
    return networks, families


def layouts_per_family(args: argparse.Namespace, device: torch.device) -> dict:
    """The ``--layouts-per-family`` mode: measure, then write bench_layout_<device type>."""
    torch.set_num_threads(args.threads)
    models = FAMILY_MODELS
    if args.archs != ARCHS_DEFAULT:
        sizes = dict(FAMILY_MODELS)
        models = tuple((a, sizes.get(a, 32)) for a in args.archs.split(","))
    methods = args.methods.split(",") if args.methods != ",".join(METHODS) else ["ind"]
    started, load_start = time.time(), os.getloadavg()
    rows = []
    for arch, size in models:
        for r in measure_layouts(arch, size, methods, args.batch, args.rounds, args.warmup,
                                 device, args.precision):
            rows.append(r)
            print(f"{arch:14s} {r['family']:22s} {r['method']:4s} {size:3d}px "
                  f"default {r['default_ms']:8.1f} ms  channels_last {r['channels_last_ms']:8.1f}"
                  f" ms  speed x{r['speed_ratio']:.2f}  load {r['load_before'][0]:.2f}->"
                  f"{r['load_after'][0]:.2f}", flush=True)
    networks, families = layout_summary(rows)
    result = {**environment(device), "mode": "layouts-per-family", "device_type": device.type,
              "precision": args.precision, "batch": args.batch, "threads": args.threads,
              "methods": methods, "cpu_count": os.cpu_count(),
              "timing": f"median of {args.rounds} interleaved rounds after {args.warmup} "
                        "(layouts interleaved, order alternating)",
              "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
              "wall_seconds": time.time() - started, "tie_band": TIE, "rows": rows,
              "networks": networks, "families": families}
    name = args.name if args.name != "bench_step" else f"bench_layout_{device.type}"
    md = layout_markdown(name, result)
    jpath, mpath = write_results(name, result, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")
    return result


def layout_markdown(name: str, result: dict) -> str:
    """The ``--layouts-per-family`` results as markdown."""
    rows, tie = result["rows"], result["tie_band"]
    return (
        f"# {name}\n\nchannels_last against the default (contiguous NCHW) layout: one training "
        f"step (`{'`, `'.join(result['methods'])}`: the library's step, as in the rest of "
        f"bench_step.py) per network, one small network per zoo family. Device: "
        f"{result['device_name']} ({result['device']}); torch {result['torch']}; "
        f"{result['precision']}; batch {result['batch']}; {result['threads']} intra-op "
        f"thread(s); step time = {result['timing']}. Load average (1/5/15 min) "
        f"{_load(result['load_average_start'])} at the start, "
        f"{_load(result['load_average_end'])} at the end ({result['cpu_count']} CPUs, shared "
        f"with other jobs); {result['wall_seconds']:.0f} s in all. CIFAR families at 32 px, "
        f"ImageNet families at 64 px (not their 224 px), so absolute times are not training "
        f"times.\n\n"
        + md_table(["network", "family", "method", "input", "default ms/step",
                    "channels_last ms/step", "speed channels_last / default", "faster",
                    "load 1-min"],
                   [[r["model"], r["family"], r["method"], f"{r['size']} px",
                     r["default_ms"], r["channels_last_ms"], f"{r['speed_ratio']:.3f}",
                     r["verdict"], f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}"]
                    for r in rows])
        + f"\nA ratio within 1 ± {tie} is a tie (the round-to-round noise here). A network's "
        f"layout: the default when one of its methods ran measurably slower in channels_last "
        f"(ratio < {1 - tie:.2f}), else channels_last (ties included: the layout recommended "
        f"for GPUs). A family's: its first network's; the others that disagree are exceptions "
        f"(dcmkd.engine.layout holds both tables):\n\n"
        + md_table(["family", "layout", "from", "speed ratio (min..max)", "exceptions"],
                   [[f, v["faster"], v["representative"],
                     f"{v['speed_ratio_min']:.2f}..{v['speed_ratio_max']:.2f}",
                     ", ".join(f"{n}: {lay}" for n, lay in v["exceptions"].items()) or "none"]
                    for f, v in result["families"].items()])
        + f"\nCommand: `{result['command']}`\n")


def _load(avg) -> str:
    return "/".join(f"{a:.2f}" for a in avg)


ARCHS_DEFAULT = "resnet20,resnet110"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:0 or auto")
    ap.add_argument("--archs", default=ARCHS_DEFAULT, help="comma-separated backbones")
    ap.add_argument("--batch", type=int, default=None,
                    help="batch size (default 128; 16 with --layouts-per-family)")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (one step per method)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--compile", action="store_true",
                    help="also time ind, dml and dcm with compile=true")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--name", default="bench_step", help="results file name")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)
    ap.add_argument("--layouts-per-family", action="store_true",
                    help="default vs channels_last step speed of one small network per zoo "
                         "family (methods: ind unless --methods); writes bench_layout_<device>")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads with --layouts-per-family (default 1)")
    args = ap.parse_args(argv)
    if args.memory_of:
        _memory_child(args.memory_of)
        return {}
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.layouts_per_family:
        args.batch = args.batch or 16
        return layouts_per_family(args, device)
    args.batch = args.batch or 128
    archs, methods = args.archs.split(","), args.methods.split(",")
    if args.compile:
        methods += [f"{m}+compile" for m in COMPILED if m in methods]

    rows = []
    for arch in archs:
        for layout in args.layouts.split(","):
            for r in measure(arch, layout, methods, args.batch, args.rounds, args.warmup,
                             device, args.precision, not args.no_memory):
                rows.append(r)
                print(f"{arch:10s} {layout:13s} {r['method']:12s} {r['images_per_s']:9.1f} img/s "
                      f"{r['step_seconds'] * 1e3:8.1f} ms/step {r['flops_per_image'] / 1e6:8.1f} "
                      f"MFLOP/img {r['gflops_per_s']:7.1f} GFLOP/s "
                      f"{r['host_reads_per_step']:.0f} reads/step"
                      + (f" compile {r['compile_seconds']:.0f}s" if r["compile_seconds"] else "")
                      + (f" peak {r['peak_memory_mib']:.0f} MiB" if r["peak_memory_mib"] else ""),
                      flush=True)
    derived = derive(rows)
    memory_note = ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                   "growth of the peak RSS (VmHWM, reset after the imports) of a process that "
                   "builds only that method and runs two steps")
    result = {**environment(device), "precision": args.precision, "batch": args.batch,
              "archs": archs,
              "timing": f"median of {args.rounds} interleaved rounds after {args.warmup}",
              "memory_note": memory_note, "rows": rows, "derived": derived,
              "all_pass": all(d["pass"] for d in derived)}
    md = (f"# {args.name}\n\nDevice: {result['device_name']} ({device}); torch "
          f"{torch.__version__}; {args.precision}; batch {args.batch}; step time = "
          f"{result['timing']} (methods interleaved).\n\n"
          + md_table(["arch", "layout", "method", "images/s", "ms/step", "MFLOP/img (fwd+bwd)",
                      "GFLOP/s", "host reads/step", "compile s", "peak MiB"],
                     [[r["arch"], r["layout"], r["method"], r["images_per_s"],
                       r["step_seconds"] * 1e3, r["flops_per_image"] / 1e6, r["gflops_per_s"],
                       r["host_reads_per_step"], r["compile_seconds"] or "",
                       r["peak_memory_mib"] or ""] for r in rows])
          + f"\nPeak memory: {memory_note}.\n\n"
          + md_table(["figure", "arch", "layout", "value", "target", "pass"],
                     [[d["figure"], d["arch"], d["layout"], round(d["value"], 3), d["target"],
                       "PASS" if d["pass"] else "FAIL"] for d in derived])
          + f"\nCommand: `{result['command']}`\n")
    jpath, mpath = write_results(args.name, result, md)
    print(md)
    print(f"wrote {jpath} and {mpath}")
    return result


if __name__ == "__main__":
    main()
