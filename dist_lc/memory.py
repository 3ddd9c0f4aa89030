"""Memory: the process's own peak."""
from __future__ import annotations

from pathlib import Path

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the RSS high-water mark (VmHWM;
    ``ru_maxrss`` would include the peak of a parent, kept across exec)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
