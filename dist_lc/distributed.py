"""The one place that reads the distributed environment and sets up the process group.

Order of precedence (see docs/ARCHITECTURE.md):
1. torchrun / explicit: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
   (read first, so torchrun inside an sbatch allocation is not mistaken for Slurm tasks);
2. a submitit job (SUBMITIT_EXECUTOR set): submitit.JobEnvironment (Slurm or local executor);
3. an srun step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (not SLURM_NTASKS, which a batch script
   also sees), SLURM_LOCALID, master = first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST;
4. otherwise a single plain process.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list (``node[01-04,07],gpu5`` → ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _port_for_job(job_id: str) -> int:
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def read_env(environ=None) -> DistEnv:
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = int(e["WORLD_SIZE"])
        return DistEnv(int(e["RANK"]), world, int(e.get("LOCAL_RANK", 0)),
                       int(e.get("LOCAL_WORLD_SIZE", world)), e.get("MASTER_ADDR", "127.0.0.1"),
                       int(e.get("MASTER_PORT", 29500)), "torchrun")
    if "SUBMITIT_EXECUTOR" in e:
        import submitit

        job = submitit.JobEnvironment()
        hosts = job.hostnames
        return DistEnv(job.global_rank, job.num_tasks, job.local_rank,
                       job.num_tasks // max(job.num_nodes, 1), hosts[0] if hosts else "127.0.0.1",
                       int(e.get("MASTER_PORT", _port_for_job(str(job.job_id)))), "submitit")
    if "SLURM_PROCID" in e and "SLURM_STEP_NUM_TASKS" in e:
        world = int(e["SLURM_STEP_NUM_TASKS"])
        nodes = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "127.0.0.1")
        local_world = int(e.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
        return DistEnv(int(e["SLURM_PROCID"]), world, int(e.get("SLURM_LOCALID", 0)), local_world,
                       e.get("MASTER_ADDR") or first_host(nodes),
                       int(e.get("MASTER_PORT", _port_for_job(e.get("SLURM_JOB_ID", "0")))), "slurm")
    return DistEnv()


def pick_device(env: DistEnv, preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        index = env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _cpu_threads(env: DistEnv) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(env.local_world_size, 1))


def _store(env: DistEnv, timeout: timedelta) -> dist.Store:
    """The rendezvous store. Under torchrun it is the agent's, kept across restarts: a prefix per
    restart stops a restarted rank from reading the dead ranks' gloo addresses (seen as
    "Gloo connectFullMesh failed ... Connection refused" after ``--max-restarts``)."""
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env.master_addr, env.master_port, world_size=env.world_size,
                          is_master=not agent and env.rank == 0, timeout=timeout, wait_for_workers=False)
    if agent:
        return dist.PrefixStore(f"dist_lc/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return store


def setup(preference: str = "auto", timeout_min: float = 30) -> tuple[DistEnv, torch.device]:
    """Read the environment, choose the device, join the process group (nccl on CUDA, gloo on CPU)."""
    env = read_env()
    device = pick_device(env, preference)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(env))
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(minutes=timeout_min)
        dist.init_process_group(backend, store=_store(env, timeout), rank=env.rank, world_size=env.world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    return env, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum floats over ranks (float64); identity on a single process."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every rank's object on rank 0 (None elsewhere); [obj] on a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
