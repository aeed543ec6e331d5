"""Shared helpers of the benchmark scripts: interleaved timing (the machines are noisy, so the contenders take
turns and we report medians and their ratio), peak resident memory, and the JSON result file."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    """A one-line name of this machine for the result file and README."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def interleaved(contenders: dict, repeats: int, warmup: int = 1, sync=None) -> dict:
    """Run each callable `warmup` times, then `repeats` rounds in which every contender runs once (the order
    rotating each round). Returns {name: [seconds per run]}."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if sync:
                sync()
            t = time.perf_counter()
            contenders[k]()
            if sync:
                sync()
            times[k].append(time.perf_counter() - t)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of resident memory (Linux: write 5 to /proc/self/clear_refs), so the next
    peak_rss_mb() reports the peak of what runs from now on, not of the set-up before it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size (MiB) since the last reset_peak_rss() (Linux VmHWM), else since the process began."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_of(argv: list[str]) -> float:
    """Peak RSS (MiB) of a fresh process running `python argv...` that prints a JSON line with "peak_rss_mb" last:
    one contender per process, so neither inherits the other's high-water mark."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def write_result(name: str, result: dict, out_dir: str = "runs/bench") -> Path:
    out = ROOT / out_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    result = {"benchmark": name, "machine": machine(), "command": "python " + " ".join(sys.argv), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path


def load_average() -> float:
    """The 1-minute load average (other jobs on a shared machine slow every contender; ratios taken in one process,
    taking turns, are what survive it)."""
    return round(os.getloadavg()[0], 2)
