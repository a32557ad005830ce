"""Small helpers shared by the benchmarks: device info and writing results (JSON + markdown)."""
from __future__ import annotations

import json
import platform
import resource
import shlex
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pick_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB). Note: on Linux a process
    started by fork + exec inherits its parent's peak at the fork; see :func:`reset_peak_rss`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> float:
    """Reset this process's peak RSS to its current RSS (Linux: ``clear_refs`` 5) and return the
    current RSS in MiB; elsewhere return the peak so far (growth is then measured from it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mib("VmRSS") or max_rss_mib()
    except OSError:
        return max_rss_mib()


def peak_rss_mib() -> float:
    """This process's peak RSS since :func:`reset_peak_rss` (Linux ``VmHWM``), in MiB."""
    return _proc_status_mib("VmHWM") or max_rss_mib()


def environment(device: torch.device) -> dict:
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
    }


def write_results(stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    jpath, mpath = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    mpath.write_text(markdown)
    return jpath, mpath


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
