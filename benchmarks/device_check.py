"""The device check: everything that needs a GPU, in one run of under 8 minutes.

1. the CUDA tests (``tests/test_cuda.py``, plus the loop and trainer tests on this machine);
2. ``bench_step`` on CUDA in bf16 + channels_last, eager and compiled, for a ResNet-110 pair and
   a WRN-28-10 pair: images/s, achieved TFLOP/s and the fraction of the GPU's dense bf16 peak
   (:data:`DENSE_BF16_TFLOPS`, by GPU model);
3. ``bench_data`` on CUDA;
4. one epoch of ``dcm`` (ResNet-20 pair, bf16, channels_last) on the real CIFAR-10 images, when
   ``--data-dir`` holds them (``benchmarks/device_data.py`` prepares a subset small enough to
   travel to a lent machine);
5. with more than one GPU, a multi-GPU row: ``bench_dist`` (data- and network-parallel ``dml``
   and ``dcm`` under ``torchrun``, NCCL) on two GPUs.

Each stage runs in its own process with its own time limit, so one failure leaves the others'
figures; everything goes to ``OUT/device-<gpu>.json`` and ``.md``.

    bash benchmarks/device_check.sh --data-dir .device-data/cifar10     # on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

#: dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from each vendor datasheet
DENSE_BF16_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
    "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0,   # V100: fp16 (no bf16 tensor cores)
}


def peak_tflops(name: str) -> float | None:
    for model in sorted(DENSE_BF16_TFLOPS, key=len, reverse=True):
        if model.lower() in name.lower():
            return DENSE_BF16_TFLOPS[model]
    return None


def run(cmd: list[str], timeout: float, log: Path) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f}s]", 124
    log.write_text(out)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": time.perf_counter() - t0,
            "tail": out[-1500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks/results"))
    ap.add_argument("--data-dir", default=None, help="a CIFAR-10 image folder (train/, test/)")
    ap.add_argument("--budget", type=float, default=450, help="seconds for the whole check")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        sys.exit("device_check: no CUDA device here")
    gpu = torch.cuda.get_device_name(0)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    peak = peak_tflops(gpu)
    py = sys.executable
    start = time.perf_counter()

    def left(share: float) -> float:
        return max(30.0, min(share, args.budget - (time.perf_counter() - start)))

    stages: dict[str, dict] = {}
    stages["tests"] = run([py, "-m", "pytest", "-q", "-x", "tests/test_cuda.py",
                           "tests/test_loop.py", "-k", "not compile_gives_the_eager"],
                          left(110), out / "device-tests.log")
    stages["bench_step"] = run(
        [py, "benchmarks/bench_step.py", "--device", "cuda", "--precision", "bf16",
         "--layouts", "channels_last", "--archs", "resnet110,wrn28_10", "--methods", "ind,dml,dcm",
         "--compile", "--rounds", "15", "--warmup", "3", "--no-memory",
         "--name", f"device-bench_step-{tag}"], left(220), out / "device-bench_step.log")
    stages["bench_data"] = run([py, "benchmarks/bench_data.py", "--device", "cuda",
                                "--images", "10000", "--epochs", "5"], left(40),
                               out / "device-bench_data.log")
    if args.data_dir and Path(args.data_dir, "train").is_dir():
        epoch_dir = Path("/tmp/dcmkd-device-epoch")
        stages["dcm_epoch"] = run(
            [py, "-m", "dcmkd.cli", "train", "-m", "dcm", "-n", "resnet20,resnet20", "-d",
             "folder", "--data-dir", args.data_dir, "-e", "1", "-o", str(epoch_dir), "-q",
             "--precision", "bf16", "channels_last=true", "data.batch_size=128",
             "device=cuda", "schedule.name=constant"], left(60), out / "device-dcm-epoch.log")
        summary = epoch_dir / "summary.json"
        if summary.is_file():
            stages["dcm_epoch"]["summary"] = json.loads(summary.read_text())
    else:
        stages["dcm_epoch"] = {"skipped": "no --data-dir with the CIFAR-10 images"}
    if torch.cuda.device_count() > 1:
        stages["multi_gpu"] = run(
            [py, "benchmarks/bench_dist.py", "--device", "cuda", "--archs", "resnet110",
             "--nproc", "2", "--batch", "128", "--rounds", "2",
             "--name", f"device-bench_dist-{tag}"], left(90), out / "device-multi-gpu.log")

    step_file = ROOT / "benchmarks/results" / f"device-bench_step-{tag}.json"
    rows = json.loads(step_file.read_text())["rows"] if step_file.is_file() else []
    for r in rows:
        r["tflops"] = r["gflops_per_s"] / 1e3
        r["fraction_of_peak"] = r["tflops"] / peak if peak else None
    result = {"gpu": gpu, "gpus": torch.cuda.device_count(), "dense_bf16_peak_tflops": peak,
              "torch": torch.__version__, "seconds": time.perf_counter() - start,
              "stages": stages, "bench_step_rows": rows}
    (out / f"device-{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Device check: {gpu} ×{torch.cuda.device_count()}", "",
             f"torch {torch.__version__}; dense bf16 peak {peak or '?'} TFLOP/s; "
             f"{result['seconds']:.0f} s in all.", "",
             "| stage | exit | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v.get('rc', v.get('skipped', ''))} | {v.get('seconds', 0):.0f} |"
              for k, v in stages.items()]
    lines += ["", "| arch | method | images/s | TFLOP/s | of peak | compile s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['method']} | {r['images_per_s']:.0f} | {r['tflops']:.1f} | "
              f"{(r['fraction_of_peak'] or 0):.1%} | {r['compile_seconds'] or ''} |" for r in rows]
    if "summary" in stages.get("dcm_epoch", {}):
        s = stages["dcm_epoch"]["summary"]
        lines += ["", f"One epoch of dcm (ResNet-20 ×2, real CIFAR-10 images, bf16): "
                      f"{s['seconds']:.1f} s, test top-1 error {s['test_top1']}"]
    (out / f"device-{tag}.md").write_text("\n".join(lines) + "\n")
    for f in (ROOT / "benchmarks/results").glob(f"device-bench_*-{tag}.*"):
        (out / f.name).write_bytes(f.read_bytes())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
