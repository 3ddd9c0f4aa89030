"""What this process may use of the machine (the one place that reads the CPU cores it may use)."""
from __future__ import annotations

import os


def usable_core_ids() -> tuple[int, ...]:
    """The ids of the CPU cores this process may run on (its affinity mask: what Slurm or taskset
    gave it), ascending; empty where the platform does not say."""
    if hasattr(os, "sched_getaffinity"):
        return tuple(sorted(os.sched_getaffinity(0)))
    return ()


def usable_cores() -> int:
    """How many CPU cores this process may run on."""
    return max(1, len(usable_core_ids()) or os.cpu_count() or 1)


# the argument that marks a local submitit job's controller (python -m submitit.local._local FOLDER)
SUBMITIT_LOCAL_CONTROLLER = b"submitit.local._local"


def cmdline(pid: int) -> list[bytes]:
    """A live process's arguments ([] when it is gone or not ours to read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []
