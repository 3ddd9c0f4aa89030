"""Helpers shared by the training benchmarks (``train_throughput.py``, ``train_memory.py``).

Standard library only at import time: ``train_throughput.py --tf-worker`` imports this module from
a separate TensorFlow virtual environment that has no torch.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SRC = REPO.parent / "shared" / "data" / "s2glc-sample"


def loadavg() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line() -> str:
    """One line: cores, arch, CPU model, ISA extensions that matter for the kernels, date, load."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f"{cores}-core {platform.machine()} ({cpu_model()}; {', '.join(isa) or 'no AVX2'}), "
            f"Python {platform.python_version()}, {date}, load average {loadavg()}")


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def spread(values) -> str:
    """``min–max`` of a list of numbers, for the tables' range columns."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{min(values):.2f}–{max(values):.2f}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A markdown table; ``align`` is one character per column, ``l`` or ``r`` (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ensure_shards(out: Path, src: Path = SAMPLE_SRC) -> Path:
    """A shard folder of the real sample: ``out`` if it already has a manifest, else packed there."""
    if (out / "manifest.json").is_file():
        return out
    subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(src), "--out", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return out


def log(msg: str) -> None:
    """Progress on stderr (the report goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", file=sys.stderr, flush=True)
