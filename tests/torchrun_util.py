"""Launch real torchrun process groups (gloo on CPU) from tests, always with a deadline."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAULTS = REPO / "tests" / "faults"


def fault(spec: str) -> dict:
    """Environment that injects a fault into every process started with it (tests/faults/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH", "")) if p)
    return {"DIST_LC_TEST_FAULT": spec, "PYTHONPATH": path}


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))}
    e.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return e


def torchrun(args: list[str], nproc: int = 2, timeout: float = 300, extra_env=None, torchrun_args=(),
             check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           *(torchrun_args or ["--standalone"]), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(**(extra_env or {})), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def dist_lc(args: list[str], timeout: float = 300, extra_env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dist_lc", *args], cwd=REPO, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)
