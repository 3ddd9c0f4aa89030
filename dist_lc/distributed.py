"""The one place that reads the distributed environment and sets up the process group.

Order of precedence (see docs/ARCHITECTURE.md):
1. torchrun / explicit: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
   (read first, so torchrun inside an sbatch allocation is not mistaken for Slurm tasks);
2. a submitit job (SUBMITIT_EXECUTOR set): submitit.JobEnvironment (Slurm or local executor);
3. an srun step: SLURM_PROCID, SLURM_STEP_NUM_TASKS (not SLURM_NTASKS, which a batch script
   also sees), SLURM_LOCALID, master = first host of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST;
4. otherwise a single plain process.

Under torchrun the ranks watch their launcher: torchrun starts each rank in a session of its own, so
a SIGKILL of the agent would leave them training as orphans; they exit when their parent is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lc_common.errors import InputError, WriteError, one_line, print_error
from lc_common.resources import SUBMITIT_LOCAL_CONTROLLER, cmdline, usable_cores

from .config import TrainConfig, choices

WATCH_PARENT_S = 0.5   # how often a torchrun rank checks that its agent still lives
LEAVE_TOGETHER_S = 10.0   # the longest a rank waits at exit for its peers to leave the process group


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"
    cpus_per_task: int | None = None   # Slurm's --cpus-per-task, where the job asked for it

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


def _port_for_job(job_id: str, step: str | None) -> int:
    """The rendezvous port of a job step, the same on each of its tasks: two steps of one allocation
    running at once get two ports, and the range stays below Linux's ephemeral ports (32768 on)."""
    return 15000 + zlib.crc32(f"{job_id}.{step or 0}".encode()) % 17000


def _tasks_on_node(spec: str, node: int) -> int:
    """This node's count in Slurm's tasks-per-node list (``4(x2)``, ``4,2``, ``2(x3),1``): nodes of
    an uneven step run different numbers of tasks."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return 1
        counts += [int(m[1])] * int(m[2] or 1)
    return counts[node] if 0 <= node < len(counts) else counts[0]


def _int(e, name: str, default=None) -> int:
    """An integer environment variable; InputError naming it when it is not one."""
    text = e.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} is not an integer") from None


def _check(env: DistEnv) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size or not 0 <= env.local_rank:
        raise InputError(f"launcher environment: rank {env.rank} of world size {env.world_size} "
                         f"(local rank {env.local_rank}) is impossible")
    if not 0 < env.master_port < 65536:
        raise InputError(f"launcher environment: MASTER_PORT {env.master_port} is not a port (1..65535)")
    return env


def read_env(environ=None) -> DistEnv:
    e = os.environ if environ is None else environ
    if "RANK" in e and "WORLD_SIZE" in e:
        world = _int(e, "WORLD_SIZE")
        return _check(DistEnv(_int(e, "RANK"), world, _int(e, "LOCAL_RANK", 0), _int(e, "LOCAL_WORLD_SIZE", world),
                              e.get("MASTER_ADDR", "127.0.0.1"), _int(e, "MASTER_PORT", 29500), "torchrun"))
    if "SUBMITIT_EXECUTOR" in e:
        import submitit

        job = submitit.JobEnvironment()
        hosts = job.hostnames
        port = _int(e, "MASTER_PORT", _port_for_job(str(job.job_id), e.get("SLURM_STEP_ID")))
        return _check(DistEnv(job.global_rank, job.num_tasks, job.local_rank,
                              job.num_tasks // max(job.num_nodes, 1), hosts[0] if hosts else "127.0.0.1",
                              port, f"submitit {e['SUBMITIT_EXECUTOR']}", _int(e, "SLURM_CPUS_PER_TASK")))
    if "SLURM_PROCID" in e and "SLURM_STEP_NUM_TASKS" in e:
        world = _int(e, "SLURM_STEP_NUM_TASKS")
        nodes = e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST", "127.0.0.1")
        local_world = _tasks_on_node(e.get("SLURM_STEP_TASKS_PER_NODE", "1"), _int(e, "SLURM_NODEID", 0))
        port = _int(e, "MASTER_PORT", _port_for_job(e.get("SLURM_JOB_ID", "0"), e.get("SLURM_STEP_ID")))
        return _check(DistEnv(_int(e, "SLURM_PROCID"), world, _int(e, "SLURM_LOCALID", 0), local_world,
                              e.get("MASTER_ADDR") or first_host(nodes), port, "slurm",
                              _int(e, "SLURM_CPUS_PER_TASK")))
    return DistEnv()


def pick_device(env: DistEnv, preference: str = "auto") -> torch.device:
    if preference not in choices(TrainConfig, "device"):   # (the config checks it; a caller may not)
        raise ValueError(f"device {preference!r} is not one of {', '.join(choices(TrainConfig, 'device'))}")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("train.device=cuda (or --device cuda) but no CUDA device is visible")
        count = torch.cuda.device_count()
        if count > 1 and env.local_rank >= count:   # NCCL would fail later on two ranks sharing one GPU
            raise InputError(f"rank {env.rank}: local rank {env.local_rank}, but its node shows {count} GPUs: one "
                             "rank per GPU (launcher.tasks_per_node, torchrun --nproc_per_node)")
        index = env.local_rank % count   # one GPU shown: the launcher bound one to each task
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _cpu_threads(env: DistEnv) -> int:
    """Intra-op threads of one CPU rank: its share of the cores it may run on, and no more than the
    cores Slurm granted it (a cluster without CPU binding leaves every job the whole node's mask)."""
    share = max(1, usable_cores() // max(env.local_world_size, 1))
    return min(share, env.cpus_per_task) if env.cpus_per_task else share


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


@dataclass(frozen=True)
class Group:
    """What an entry point hands down: this process's place in the launch and its device."""
    env: DistEnv
    device: torch.device
    store: object = None   # the rendezvous store, kept for leaving together (None: no process group)


_owned: list[Group] = []   # the group of the entry point that is running, if any


def _join(preference: str, timeout_s: float) -> Group:
    env = read_env()
    device = pick_device(env, preference)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(env))
    if env.source == "torchrun":
        watch_parent()
    elif env.source == "submitit local":   # a controller killed: its ranks would train on unwatched
        watch_parent(expected=SUBMITIT_LOCAL_CONTROLLER)
    store = None
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store = _store(env, timeout)
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
    return Group(env, device, store)


@contextlib.contextmanager
def process_group(preference: str = "auto", timeout_s: float = 600):
    """Own the process group of one entry point (train, predict, map, a fold job): read the
    environment, choose the device, join (nccl on CUDA, gloo on CPU) on entry; leave on exit,
    errors and signals included. Yields the :class:`Group` that everything below receives.

    ``timeout_s`` bounds every collective: when a peer dies, the others fail after at most this
    long instead of NCCL's 30-minute default. Inside an open group (a fold job's training, then
    its prediction) it yields that group and leaves it to its owner.
    """
    if _owned:
        yield _owned[-1]
        return
    finished, created = False, not dist.is_initialized()   # a group the caller opened stays the caller's
    try:
        _owned.append(_join(preference, timeout_s))
        yield _owned[-1]
        finished = True
    finally:
        group = _owned.pop() if _owned else None
        if created and dist.is_initialized():
            dist.destroy_process_group()
        if finished and group is not None and group.store is not None:
            _leave_together(group)


def _leave_together(group: Group) -> None:
    """After a run that ended well, wait (briefly) until every rank has left the process group
    before this process exits: a rank that exits while a peer is still tearing gloo down closes
    its sockets under the peer's threads, which then abort the peer ("terminate called without an
    active exception", SIGABRT) although the run succeeded. The rendezvous store outlives the group."""
    world = group.env.world_size
    deadline = time.monotonic() + LEAVE_TOGETHER_S
    try:
        left = group.store.add("dist_lc/left", 1)
        while left < world and time.monotonic() < deadline:
            time.sleep(0.05)
            left = group.store.add("dist_lc/left", 0)
    except Exception:  # noqa: BLE001 - the store's host may already be gone: nothing left to wait for
        pass


_keys_made: dict[str, int] = {}


def _store_key(kind: str) -> str:
    """A new key of the rendezvous store for ``kind``: the ranks of a group make the same flags and
    broadcasts in the same order, so the n-th of a kind has one key on every rank."""
    _keys_made[kind] = _keys_made.get(kind, 0) + 1
    return f"dist_lc/{kind}/{_keys_made[kind]}"


def broadcast_untimed(obj, poll_s: float = 1.0):
    """Rank 0's ``obj`` (JSON) on every rank, through the rendezvous store, without the collectives'
    timeout: after a step that rank 0 does alone and whose time grows with the work (the overviews of
    a map of any size), where a broadcast would end the waiting ranks after ``timeout_s``. The wait
    still ends if rank 0 dies: the store's host goes with it (srun), or its launcher ends the others
    (torchrun)."""
    group = _owned[-1] if _owned else None
    if not dist.is_initialized():
        return obj
    if group is None or group.store is None:   # a group its caller opened: no store of ours to go through
        return broadcast_object(obj)
    key = _store_key("untimed")
    if is_main():
        group.store.set(key, json.dumps(obj))
        return obj
    while not group.store.check([key]):
        time.sleep(poll_s)
    return json.loads(group.store.get(key))


class PeerFailed:
    """A flag that any rank sets and every rank reads without a collective, through the rendezvous
    store: for a loop whose ranks run unequal numbers of steps (a prediction's shares), where no
    collective per step can be agreed. A rank that fails sets it; its peers stop at their next check
    instead of finishing their share while it waits for them in the final collective, where the
    group's timeout could end it before its cause is heard. The store is asked at most every
    ``every_s``: hundreds of ranks asking per batch would load rank 0's host."""
    def __init__(self, group: Group, name: str, every_s: float = 1.0):
        self.store, self.every_s, self._asked = group.store, every_s, time.monotonic()
        self.key = _store_key(f"failed/{name}") if self.store is not None else None

    def set(self) -> None:
        if self.store is not None:
            try:
                self.store.set(self.key, "1")
            except Exception:  # noqa: BLE001 - the store's host gone: the final collective fails anyway
                pass

    def is_set(self) -> bool:
        if self.store is None or time.monotonic() - self._asked < self.every_s:
            return False
        self._asked = time.monotonic()
        try:
            return self.store.check([self.key])
        except Exception:  # noqa: BLE001 - a store that does not answer is no peer's failure: the gather says
            return False


def single_process(preference: str = "auto") -> Group:
    """The group of a plain process with no launcher (tests, benchmarks): no collective to join."""
    env = DistEnv()
    device = pick_device(env, preference)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(env))
    return Group(env, device)


_watching: list = []
_last_words: list = []   # called with the reason before this process ends on its own


@contextlib.contextmanager
def last_words(record):
    """Within the block, ``record(reason)`` runs before this process exits on its own (its launcher
    gone): the run folder then says why, and the peers report it instead of a closed connection."""
    _last_words.append(record)
    try:
        yield
    finally:
        _last_words.remove(record)


def watch_parent(expected: bytes | None = None) -> None:
    """Exit when the launcher that started this process dies (it is then reparented). ``expected``:
    a word of the launcher's command line; a parent without it is one this process was reparented
    to before the watch began (its launcher died while it started)."""
    if _watching:
        return
    parent = os.getppid()
    orphaned = expected is not None and expected not in cmdline(parent)

    def watch():
        while os.getppid() == parent and not orphaned:
            time.sleep(WATCH_PARENT_S)
        reason = (f"the launcher of this rank was gone before it started (its parent is pid {parent})" if orphaned
                  else f"the launcher of this rank (pid {parent}) is gone")
        for record in list(_last_words):
            try:
                record(reason)
            except Exception:  # noqa: BLE001 - the exit below must happen whatever the note does
                pass
        print_error(f"{reason}; exiting")
        os._exit(1)

    _watching.append(threading.Thread(target=watch, name="dist_lc-watch-parent", daemon=True))
    _watching[0].start()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def new_launch_name() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def launch_id() -> str:
    """A name for this launch, the same on every rank and across restarts of the launch: the Slurm
    job id (a requeued job keeps it; torchrun inside the job included, whose ``--standalone``
    rendezvous id is new at every start; every launch of one job shares it), else torchrun's
    rendezvous id, else one chosen by the first rank to ask torchrun's agent store (kept across
    ``--max-restarts``), else a new timestamped name (broadcast from rank 0)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_" \
        f"{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}" or os.environ.get("SLURM_JOB_ID")
    if job:
        return job
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rdzv and rdzv != "none":
        return rdzv
    env = read_env()
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timedelta(seconds=60))
        return store.compare_set("dist_lc/launch_name", "", new_launch_name()).decode()
    return broadcast_object(new_launch_name())


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank. DDP broadcasts them before each
    training forward, so after the last one every rank holds its own update; evaluating with rank 0's
    makes every rank score the model that rank 0 saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)


def all_reduce_sum(values: list, device: torch.device) -> list[float]:
    """Sum floats or 0-d tensors on ``device`` over ranks (float64); identity on a single process.
    Python numbers are filled in on the device (no copy from the host, which would wait for the
    device's queue): the host waits once, for the result."""
    t = torch.stack([v.to(device=device, dtype=torch.float64) if isinstance(v, torch.Tensor)
                     else torch.full((), float(v), dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: float, device: torch.device) -> float:
    """The smallest of the ranks' values; the value itself on a single process."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn, *args, errors: tuple = (InputError, WriteError)):
    """``fn(*args)`` run by rank 0 alone (the one that reads or writes what the ranks share), its
    value on every rank. When it raises one of ``errors`` (exceptions that pickle), every rank raises
    it; any other exception is raised on rank 0 with its traceback and, on the others, as a
    RuntimeError naming it: a rank that raised alone would leave the others waiting in the broadcast.
    A collective."""
    value, error, own = None, None, None
    if is_main():
        try:
            value = fn(*args)
        except errors as exc:
            error = own = exc
        except Exception as exc:   # noqa: BLE001 - a bug, an unforeseen OSError: raised below
            own, error = exc, RuntimeError(f"rank 0 failed: {type(exc).__name__}: {one_line(exc)}")
    value, error = broadcast_object((value, error))
    if own is not None:
        raise own
    if error is not None:
        raise error
    return value


def all_gather_objects(obj) -> list:
    """Every rank's object, on every rank; [obj] on a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj) -> list | None:
    """Every rank's object on rank 0 (None elsewhere); [obj] on a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
