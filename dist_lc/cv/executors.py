"""Where `dist-lc cv` runs its jobs: one :class:`Executor` class per kind, submitit underneath.

Every kind answers the same few questions (:class:`Executor`): is it usable, how many jobs at once,
submit these, what is this job's :class:`JobState`, cancel it, how often to look, how long a job
gone without ``done.json`` or with a failed task is given, and what a stop of the launcher (Ctrl-C,
SIGTERM, SIGHUP) does to its jobs. The names are declared once, as the ``Literal`` of
``LauncherConfig.executor``; :data:`EXECUTORS` maps each of them to its class.

The executor is chosen explicitly (submitit would pick Slurm whenever ``srun`` is on PATH), Slurm
jobs are one array capped at ``max_parallel``, their srun kills the other tasks when one fails
(``--kill-on-bad-exit``), and a job's state comes from done.json, its tasks' result pickles and
``squeue``, never from a blocking ``job.result()`` (without accounting a killed job never writes its
pickle).
"""
from __future__ import annotations

import abc
import atexit
import contextlib
import enum
import functools
import io
import math
import os
import shutil
import signal
import subprocess
import time
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import submitit

from lc_common.errors import InputError, said
from lc_common.resources import SUBMITIT_LOCAL_CONTROLLER, cmdline, usable_core_ids, usable_cores

from ..config import LauncherConfig
from .job import FoldJob
from .plan import DONE, Submission, now

ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                       "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                       "PREEMPTED", "RESV_DEL_HOLD"}
# Slurm end states of a job lost with its node, or to a preemption that cancelled it (PREEMPTED is
# active above, as under PreemptMode=REQUEUE the job returns to PENDING; one that leaves squeue
# after it was cancelled): submitted once more. Not the others: a cancel, the time or memory limit
# were meant, and a job that FAILED without a result pickle (a bad launcher.setup) would fail again.
LOST_SLURM_ENDS = {"NODE_FAIL", "BOOT_FAIL", "PREEMPTED"}
LOCAL_END_S = 5.0           # local: how long a cancelled job's processes get before they are killed
LOCAL_QUIET_S = 10.0        # local: how long a cancelled job's tasks get to end before its controller is told
                            # (a GPU task's teardown, its loader workers and compile workers take seconds);
                            # the launcher's loop goes on meanwhile
# the part of a shared GPU's memory that its jobs' caps divide between them: each process's CUDA
# context and NCCL's buffers lie outside the caching allocator, and so outside its cap
SHARED_GPU_USABLE = 0.9
# submitit's local controller starts a job's tasks at most 6 times (its run(max_retry=6)), whatever
# max_num_timeout says: a seventh attempt would end as a job lost without a result
LOCAL_MAX_REQUEUES = 5
SUBMIT_BACKOFF_S = (5.0, 15.0, 40.0)   # the waits before a busy scheduler is asked again to take jobs
# sbatch's words for a controller that is busy or restarting (not for jobs it refuses): worth another try
SBATCH_TRANSIENT = ("timed out", "unable to contact slurm controller", "temporarily unavailable",
                  "connection refused", "connection reset", "zero bytes were transmitted")


class Busy(Exception):
    """The scheduler did not take the jobs because it is busy or restarting (nothing was submitted):
    worth another try. Its message is the scheduler's."""


class JobState(enum.Enum):
    """Where one (grid point, fold) job stands, as the launcher sees it."""
    QUEUED = "queued"    # not submitted yet by this launch
    PENDING = "pending"  # submitted, waiting for resources
    RUNNING = "running"
    UNKNOWN = "unknown"  # the scheduler did not answer this time
    ENDED = "ended"      # gone without done.json or an error: failed once the executor's grace has passed
    DONE = "done"        # its run dir holds done.json
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)

    @property
    def live(self) -> bool:
        """Still the executor's: a later launch watches it rather than submitting the fold again."""
        return self in (JobState.PENDING, JobState.RUNNING, JobState.UNKNOWN)


@dataclass(frozen=True)
class Status:
    state: JobState
    detail: str = ""
    log: str = ""   # the log to read (a failed job's: its first failed task's)


@dataclass(frozen=True)
class Work:
    """One job to submit: a (grid point, fold) and what its tasks run."""
    point: str
    fold: int
    config: dict
    run_dir: Path
    tta: bool


Submitted = tuple[Submission, object]   # the record kept in jobs.json, and this launch's handle on the job


class Executor(abc.ABC):
    """One kind of place that runs CV jobs. Subclasses set the class attributes and implement the
    abstract methods; the others have the defaults of a submitit-backed executor."""

    name: ClassVar[str]                       # as declared in LauncherConfig.executor
    aliases: ClassVar[tuple[str, ...]] = ()   # other names of it in cv.json
    poll_s: ClassVar[float]                   # between two looks at the jobs
    gone_grace_s: ClassVar[float]             # a job gone without done.json is failed after this long
    task_failed_grace_s: ClassVar[float | None] = None  # None: the executor itself ends a job whose task failed

    def __init__(self, launcher: LauncherConfig, folder: Path, jobs: int = 1):
        """``folder``: this launch's submitit folder (created at the first submission); ``jobs``: how
        many this launch may submit."""
        self.launcher, self.folder, self.jobs = launcher, Path(folder), max(jobs, 1)
        self._engine = None

    # --- before anything is submitted

    @classmethod
    def check_launcher(cls, launcher: LauncherConfig) -> None:
        """Raise InputError when the launcher section asks what this kind cannot do."""

    @classmethod
    def problem(cls) -> str | None:
        """Why jobs cannot be submitted now (one line), None when they can."""
        return None

    @abc.abstractmethod
    def capacity(self) -> float:
        """Jobs that run (or queue) at once; math.inf: as many as are submitted."""

    # --- submitting

    @property
    def engine(self):
        """The submitit executor, made at first use: a fresh folder per launch (Slurm job ids may restart at 1)."""
        if self._engine is None:
            self._engine = self.make_engine()
        return self._engine

    def make_engine(self):
        raise NotImplementedError(f"the {self.name} executor has no submitit engine")

    @abc.abstractmethod
    def submit(self, work: list[Work]) -> list[Submitted]:
        """Submit the jobs; one (record, handle) per item, in order."""

    @property
    def tasks(self) -> int:
        return self.launcher.nodes * self.launcher.tasks_per_node

    def _records(self, work: list[Work], handles: list) -> list[Submitted]:
        stamp = now()
        return [(Submission(item.point, item.fold, self.name, str(job.job_id), str(job.paths.stderr),
                            str(job.paths.result_pickle), stamp, self.tasks), job)
                for item, job in zip(work, handles)]

    # --- watching

    def adopt(self, record: Submission) -> None:
        """Watch a job an earlier launch submitted, which still runs (what it holds stays held)."""

    def refuses(self, record: Submission) -> str | None:
        """Why a job an earlier launch submitted, if it still runs, cannot be watched beside this
        launch's jobs (None: it can)."""
        return None

    def refresh(self, records: list[Submission]) -> None:
        """One look at the scheduler for these jobs, before their status is asked one by one."""

    @abc.abstractmethod
    def presence(self, record: Submission, handle=None) -> tuple[JobState | None, str]:
        """(PENDING | RUNNING | UNKNOWN, detail) while the executor has the job, else (None, how it left)."""

    def status(self, record: Submission, run_dir: Path, handle=None) -> Status:
        """done: done.json exists. Else the executor's word while it has the job (a requeued Slurm job
        is running, even with an error pickle from an attempt that Slurm's SIGTERM cut short).
        failed: gone, and a task's result pickle holds an exception (the log is that task's). ended:
        gone without either; the caller turns it into a failure after ``gone_grace_s`` (files may lag
        on a network filesystem)."""
        if (Path(run_dir) / DONE).exists():
            return Status(JobState.DONE, "", record.stderr)
        state, detail = self.presence(record, handle)
        if state is not None:
            return Status(state, detail, record.stderr)
        failure = self.first_failure(record)
        if failure:
            return Status(JobState.FAILED, f"{detail}: {failure[0]}", failure[1])
        return Status(JobState.ENDED, detail, record.stderr)

    def first_failure(self, record: Submission) -> tuple[str, str] | None:
        """(the error, the log) of the job's task that failed first, or None."""
        return first_failure(record)

    @classmethod
    def lost(cls, detail: str) -> bool:
        """Whether a job gone without done.json or an error, as ``detail`` (presence's word when it
        was first seen gone) says, was lost rather than ended on purpose: the launcher then submits it
        once more (its fold resumes)."""
        return True

    # --- ending

    @abc.abstractmethod
    def cancel(self, record: Submission, handle=None) -> None:
        """End the job (its state then shows it gone, at once or at a later poll)."""

    def cancel_all(self, jobs: list[Submitted]) -> None:
        """End these jobs (each one's state then shows it gone)."""
        for record, handle in jobs:
            self.cancel(record, handle)

    @abc.abstractmethod
    def interrupt(self, jobs: list[Submitted]) -> str:
        """The launcher is stopped (Ctrl-C, SIGTERM, SIGHUP) while these jobs are unfinished: end or
        leave them, within a bounded time; says what happened to them (a few words for one line)."""


# ----------------------------------------------------------------------------- local processes

class LocalExecutor(Executor):
    """Jobs as processes of this machine: submitit's controller, one process per task. Each job runs
    on a slot of its own (its GPUs, or else a slice of the cores); nothing queues beyond capacity."""

    name = "local"
    poll_s = 0.5                          # a look is cheap: a process and a few files
    gone_grace_s = 2.0

    @property
    def task_failed_grace_s(self) -> float:   # what srun's --kill-on-bad-exit does on Slurm
        return self.launcher.task_failed_grace_s

    def __init__(self, launcher: LauncherConfig, folder: Path, jobs: int = 1):
        super().__init__(launcher, folder, jobs)
        self._slots: dict[str, int] = {}   # job id → the slot it runs on, until it is done or failed
        self._quieting: dict[str, tuple] = {}   # cancelled job id → (deadline, tasks, controller, handle)
        self._settles_at_exit = False

    @classmethod
    def check_launcher(cls, launcher: LauncherConfig) -> None:
        if launcher.nodes != 1:
            raise InputError(f"config key 'launcher.nodes': {launcher.nodes} needs --executor slurm (the local "
                             "executor has one node)")
        if launcher.max_requeues > LOCAL_MAX_REQUEUES:
            raise InputError(f"config key 'launcher.max_requeues': {launcher.max_requeues}, but submitit's local "
                             f"executor restarts a job at most {LOCAL_MAX_REQUEUES} times (at most "
                             f"{LOCAL_MAX_REQUEUES}, or --executor slurm)")
        if launcher.gpus_per_node:
            seen = gpu_count()
            if launcher.gpus_per_node > seen:
                shown = os.environ.get("CUDA_VISIBLE_DEVICES")
                raise InputError(f"config key 'launcher.gpus_per_node': {launcher.gpus_per_node}, but this machine "
                                 f"shows {seen} GPU(s) (CUDA_VISIBLE_DEVICES {shown!r})")
            physical_gpus(range(seen))   # a list the jobs cannot be given is refused before any is submitted

    def capacity(self) -> float:
        return self.launcher.max_parallel or local_capacity(self.launcher)

    def make_engine(self):
        lc = self.launcher
        ex = submitit.LocalExecutor(folder=self.folder / "%j", max_num_timeout=lc.max_requeues)
        ex.update_parameters(timeout_min=lc.time_min, tasks_per_node=lc.tasks_per_node,
                             signal_delay_s=lc.signal_delay_s, setup=list(lc.setup), gpus_per_node=lc.gpus_per_node)
        return ex

    def submit(self, work: list[Work]) -> list[Submitted]:
        """One job at a time, each on the lowest free slot. Should one fail to start, those already
        started are cancelled: returned to no one, nothing would record or watch them."""
        out = []
        try:
            for item in work:
                out.append(self._submit_one(item))
        except BaseException:
            self.cancel_all(out)
            raise
        return out

    def _submit_one(self, item: Work) -> Submitted:
        slots = int(self.capacity())
        slot = min(set(range(slots)) - set(self._slots.values()), default=0)
        with own_environment(), controller_in_own_session():
            submitted = self.engine.submit(self._fold_job(item, slot, slots))
        (record, handle), = self._records([item], [submitted])
        record.slot, record.layout = slot, self.layout()
        self._slots[record.job_id] = slot
        return record, handle

    def _fold_job(self, item: Work, slot: int, slots: int) -> FoldJob:
        """The job's callable, its GPUs or else its cores set for ``slot`` of ``slots`` concurrent jobs."""
        gpus = self.launcher.gpus_per_node
        if gpus:
            # slots go round the GPU groups, so that every GPU has a job before any has two (jobs_per_gpu
            # of them share one); slots beyond that (max_parallel above the GPUs) wrap around and share too
            groups = max(1, gpu_count() // gpus)
            group, per_gpu = slot % groups, math.ceil(slots / groups)   # jobs_per_gpu at most, unless max_parallel
            self.engine.update_parameters(visible_gpus=physical_gpus(range(group * gpus, (group + 1) * gpus)))
            share = SHARED_GPU_USABLE / per_gpu if per_gpu > 1 else None
            return FoldJob(item.config, str(item.run_dir), item.tta, gpu_share=share)
        return FoldJob(item.config, str(item.run_dir), item.tta, cpu_slice(slot, slots))

    def first_failure(self, record: Submission) -> tuple[str, str] | None:
        # a local job's folder is named by its pid, which the system hands out again once it wraps
        # around: an earlier job's error pickle there is older than this job (one clock, one disk)
        return first_failure(record, since=_seconds(record.submitted))

    def adopt(self, record: Submission) -> None:
        if record.slot is not None:   # a job this launch submits must not get the same GPUs or cores
            self._slots[record.job_id] = record.slot

    def layout(self) -> str:
        """What a slot number means: how many there are, and the GPUs or cores they are dealt from."""
        slots, gpus = int(self.capacity()), self.launcher.gpus_per_node
        if gpus:
            return f"{slots} slot(s) over GPUs {list(physical_gpus(range(gpu_count())))}, {gpus} a job"
        return f"{slots} slot(s) over cores {list(usable_core_ids())}"

    def refuses(self, record: Submission) -> str | None:
        """A job of an earlier launch holds the GPUs or cores of its slot as its launcher keys dealt them:
        under other keys its slot number would name other ones, and a new job could be given its GPU."""
        if record.layout is None or record.layout == self.layout() or self.presence(record)[0] is None:
            return None
        return (f"job {record.job_id} still runs on slot {record.slot} of {record.layout}, and the launcher keys "
                f"given now make {self.layout()}")

    def presence(self, record: Submission, handle=None) -> tuple[JobState | None, str]:
        if handle is not None:
            alive = not handle.done()
        else:   # an earlier launch's job: its pid, if still a submitit controller (not a reused pid)
            alive = record.job_id.isdigit() and _controller(int(record.job_id), children_of()) is not None
        return (JobState.RUNNING, "") if alive else (None, "process exited")

    def status(self, record: Submission, run_dir: Path, handle=None) -> Status:
        self._escalate()
        status = super().status(record, run_dir, handle)
        if status.state.final or status.state is JobState.ENDED:   # its processes are gone or going
            self._slots.pop(record.job_id, None)
        return status

    def cancel(self, record: Submission, handle=None) -> None:
        self.cancel_all([(record, handle)])

    def cancel_all(self, jobs: list[Submitted]) -> None:
        """SIGINT to the jobs' tasks, after which each controller ends by itself; returns at once (the
        launcher's loop goes on, and polls the jobs until they are gone). A job whose tasks are still
        there LOCAL_QUIET_S later (seen at a poll), or that has none yet, gets submitit's own cancel."""
        deadline = time.monotonic() + LOCAL_QUIET_S
        fresh = [job for job in jobs if job[0].job_id not in self._quieting]   # a repeat keeps its deadline
        for job_id, (controller, tasks, handle) in self._interrupt_tasks(fresh).items():
            if tasks:
                self._quieting[job_id] = (deadline, tasks, controller, handle)
            else:
                self._cancel_controller(controller, handle)
        if self._quieting and not self._settles_at_exit:   # however the launcher ends, none is left running
            atexit.register(self.settle)
            self._settles_at_exit = True

    def settle(self) -> None:
        """Wait for the cancelled jobs' tasks to end, giving submitit's cancel to those that outlive
        LOCAL_QUIET_S (at the launcher's exit: its loop no longer polls them)."""
        while self._quieting:
            self._escalate()
            if self._quieting:
                time.sleep(0.1)

    def _escalate(self) -> None:
        """Submitit's cancel for the cancelled jobs whose tasks outlived their LOCAL_QUIET_S."""
        now = time.monotonic()
        for job_id, (deadline, tasks, controller, handle) in list(self._quieting.items()):
            left = _wait_gone(tasks, 0)
            if left and now >= deadline:
                self._cancel_controller(controller, handle)
            if not left or now >= deadline:
                del self._quieting[job_id]

    @staticmethod
    def _interrupt_tasks(jobs: list[Submitted]) -> dict[str, tuple[int, list, object]]:
        """SIGINT to the tasks of the jobs whose controller is alive: {job id: (controller, its tasks,
        the job's handle)}. (The controller writes to the launcher's stderr: interrupted itself, it
        prints a traceback there; its tasks' output goes to the job's logs.)"""
        children = children_of()   # one look at /proc for all the jobs
        out = {}
        for record, handle in jobs:
            controller = _controller(int(record.job_id), children)
            if controller:
                out[record.job_id] = (controller, _children(controller, children), handle)
        for pid, _ in [t for _, tasks, _ in out.values() for t in tasks]:
            _signal(pid, signal.SIGINT)
        return out

    @staticmethod
    def _cancel_controller(controller: int, handle) -> None:
        """Submitit's cancel: SIGINT to the controller, which interrupts the tasks again and kills what
        is left a second later."""
        if handle is not None:
            handle.cancel(check=False)
        else:   # a job of an earlier launch, known by its controller's pid
            _signal(controller, signal.SIGINT)

    @classmethod
    def _end_quietly(cls, jobs: list[Submitted], wait_s: float = LOCAL_QUIET_S) -> None:
        """As :meth:`cancel_all`, waiting here (at most ``wait_s``) for the tasks to end."""
        found = cls._interrupt_tasks(jobs)
        left = set(_wait_gone([t for _, tasks, _ in found.values() for t in tasks], wait_s))
        for controller, tasks, handle in found.values():
            if not tasks or left.intersection(tasks):
                cls._cancel_controller(controller, handle)

    def interrupt(self, jobs: list[Submitted]) -> str:
        """Nothing watches local jobs once the launcher is gone: end them all, their controllers and
        every process they started, killing what is still there after LOCAL_END_S."""
        trees = [_process_tree(int(record.job_id)) for record, _ in jobs if _pid_alive(record.job_id)]
        trees = [tree for tree in trees if tree]   # a controller that ended between the two looks
        # cancelled moments ago: not interrupted twice, killed below if need be (other cancelled jobs,
        # such as those whose record could not be written, stay for settle() at exit)
        interrupted = {record.job_id for record, _ in jobs} & set(self._quieting)
        for job_id in interrupted:
            del self._quieting[job_id]
        self._end_quietly([job for job in jobs if job[0].job_id not in interrupted], LOCAL_END_S)
        _wait_gone([p for tree in trees for p in tree], LOCAL_END_S)
        _wait_gone(_kill_what_is_left(trees), LOCAL_END_S)
        for _, handle in jobs:
            if handle is not None:
                handle.done()   # reaps the controller this process started
        return f"{len(jobs)} local job(s) ended"


def physical_gpus(indices) -> tuple[int, ...]:
    """The GPUs to give a local job, as the devices this process sees (``indices``) are numbered by
    CUDA_VISIBLE_DEVICES: a job's CUDA_VISIBLE_DEVICES holds physical numbers, and a launcher started
    on GPUs 2 and 3 must hand out 2 and 3, not 0 and 1."""
    mine = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mine is None or not mine.strip():
        return tuple(indices)
    ids = [x.strip() for x in mine.split(",")]
    if not all(x.isdigit() for x in ids):
        raise InputError(f"CUDA_VISIBLE_DEVICES {mine!r}: the local executor hands out GPUs by number; "
                         "list them by number, not by UUID")
    return tuple(int(ids[i]) for i in indices)


def gpu_count() -> int:
    """The GPUs this machine shows the local executor's jobs (CUDA_VISIBLE_DEVICES applied)."""
    import torch   # here, not at the top: a launcher that asks for no GPU stays free of torch

    return torch.cuda.device_count()


def local_capacity(launcher: LauncherConfig) -> int:
    """Jobs the local machine runs at once: GPUs (or CPU cores) over what one job takes."""
    if launcher.gpus_per_node:
        return max(1, gpu_count() // launcher.gpus_per_node) * launcher.jobs_per_gpu
    return max(1, usable_cores() // (launcher.tasks_per_node * launcher.cpus_per_task))


def cpu_slice(slot: int, slots: int) -> tuple[int, ...] | None:
    """The cores local job ``slot`` of ``slots`` concurrent ones runs on, as Slurm's cgroups would
    give them: without it every job sizes its thread pool for the whole machine, and two jobs'
    OpenMP pools spinning on the same cores run many times slower than one job after the other."""
    if slots <= 1:
        return None
    cores = usable_core_ids()
    if not cores:
        return None
    per = len(cores) // slots
    if per == 0:  # more jobs than cores (max_parallel above capacity): one core each, shared
        return (cores[slot % len(cores)],)
    return tuple(cores[slot * per:(slot + 1) * per])


# ----------------------------------------------------------------------------- processes, by /proc

def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _pid_alive(pid) -> bool:
    try:
        fields = _stat_fields(int(pid))
    except ValueError:
        return False
    return fields is not None and fields[0] not in ("Z", "X")


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot): a pid reused by another process differs."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and fields[0] not in ("Z", "X") else None


def children_of() -> dict[int, list[int]]:
    """{parent pid: its children's pids} of every live process."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _controller(pid: int, children: dict[int, list[int]]) -> int | None:
    """The pid of a local job's submitit controller: the job's own process, or its child when
    ``launcher.setup`` runs the controller under a shell; None when neither is one (the job is gone
    and its pid perhaps reused). ``children``: :func:`children_of`."""
    for candidate in [pid, *children.get(pid, [])]:
        # an argument of its own (python -m submitit.local._local), not inside a shell's command
        if SUBMITIT_LOCAL_CONTROLLER in cmdline(candidate):
            return candidate
    return None


def _children(pid: int, children: dict[int, list[int]] | None = None) -> list[tuple[int, str]]:
    """(pid, start time) of a process's live children (``children``: :func:`children_of`, else read now)."""
    children = children_of() if children is None else children
    return [(child, started) for child in children.get(pid, []) if (started := _start_time(child))]


def _process_tree(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of a live process and all its descendants, the root first."""
    children = children_of()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        started = _start_time(pid)
        if started is not None:
            tree.append((pid, started))
            todo += children.get(pid, [])
    return tree


def _kill_what_is_left(trees: list[list[tuple[int, str]]]) -> list[tuple[int, str]]:
    """SIGKILL what is left of these process trees, processes started in them since included."""
    known = set()
    for tree in trees:
        root, started = tree[0]
        known.update(tree, _process_tree(root) if _start_time(root) == started else [])
    left = [(pid, started) for pid, started in known if _start_time(pid) == started]
    for pid, _ in left:
        _signal(pid, signal.SIGKILL)
    return left


def _wait_gone(processes: list[tuple[int, str]], limit_s: float) -> list[tuple[int, str]]:
    """Wait up to ``limit_s`` for the processes to end; those still there."""
    deadline = time.monotonic() + limit_s
    while True:
        left = [(pid, started) for pid, started in processes if _start_time(pid) == started]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


@contextlib.contextmanager
def own_environment():
    """Jobs submitted meanwhile do not inherit the launcher's Slurm and rendezvous variables
    (submitit's ``clean_env``): a launcher run inside an allocation (an salloc shell, a CPU job) would
    hand its SLURM_* to the jobs, whose srun then refuses them ("mutually exclusive") or takes over
    their binding, and an exported MASTER_PORT would put every job on one port. SLURM_CONF, which
    names the cluster, stays."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        yield


@contextlib.contextmanager
def controller_in_own_session():
    """The local jobs submitted meanwhile start their submitit controller (and so their tasks) in a
    session of its own. In the launcher's, a terminal's Ctrl-C reaches every controller too, each of
    which dies printing a traceback into the launcher's output, while the launcher ends the jobs
    itself (its stop signals). submitit's ``start_controller`` takes no such option: its module's
    ``subprocess`` is swapped, for this call only, for one whose Popen starts a new session."""
    from submitit.local import local

    class OwnSession(types.ModuleType):
        Popen = staticmethod(functools.partial(subprocess.Popen, start_new_session=True))

        def __getattr__(self, name):
            return getattr(subprocess, name)

    real = local.subprocess
    local.subprocess = OwnSession("subprocess")
    try:
        yield
    finally:
        local.subprocess = real


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (OSError, ValueError):   # gone meanwhile
        pass


# ----------------------------------------------------------------------------- Slurm

class SlurmExecutor(Executor):
    """Jobs of a Slurm cluster, one array per launch; they outlive the launcher, which a later
    ``--resume`` watches again."""

    name = "slurm"
    aliases = ("sbatch",)     # a CV folder written by slurm/cv_array.sbatch resumes on Slurm
    poll_s = 2.0              # squeue asks the controller: not too often
    # an NFS client caches a folder's attributes up to acdirmax (60 s by default): done.json written on a
    # compute node may show here only that long after its job has left squeue
    gone_grace_s = 75.0
    task_failed_grace_s = None  # srun's --kill-on-bad-exit ends the job

    def __init__(self, launcher: LauncherConfig, folder: Path, jobs: int = 1):
        super().__init__(launcher, folder, jobs)
        self._asked: set[str] = set()              # the job ids of the last look at squeue
        self._listed: dict[str, str] | None = {}   # its answer: the active ones; None: it did not answer
        self._looked_at = -math.inf                 # when (time.monotonic())
        self._preempted: set[str] = set()          # jobs squeue has shown PREEMPTED

    @classmethod
    def problem(cls) -> str | None:
        return slurm_problem()

    def capacity(self) -> float:
        return math.inf  # Slurm queues; the array's parallelism carries launcher.max_parallel

    def make_engine(self):
        lc = self.launcher
        ex = submitit.SlurmExecutor(folder=self.folder / "%j", max_num_timeout=lc.max_requeues)
        params = {"time": lc.time_min, "nodes": lc.nodes, "ntasks_per_node": lc.tasks_per_node,
                  "cpus_per_task": lc.cpus_per_task, "job_name": "dist-lc-cv",
                  "signal_delay_s": lc.signal_delay_s, "setup": list(lc.setup),
                  "additional_parameters": dict(lc.slurm_extra),
                  "array_parallelism": lc.max_parallel or self.jobs,
                  # one failed rank ends the job, not a hang; srun from Slurm 22.05 to 23.02 does not
                  # inherit sbatch's --cpus-per-task and would bind each rank and its loader workers to one core
                  "srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={lc.cpus_per_task}"]}
        optional = {"gpus_per_node": lc.gpus_per_node or None, "partition": lc.partition,
                    "account": lc.account, "mem": f"{int(lc.mem_gb * 1024)}MB" if lc.mem_gb else None}
        ex.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
        return ex

    def submit(self, work: list[Work]) -> list[Submitted]:
        """One array. sbatch's errors of a busy or restarting controller raise :class:`Busy` (the
        launcher tries again: Slurm's advice); any other is one line. A submission that timed out
        although Slurm queued it starts without the pickles submitit moves in only once sbatch
        answers, and fails within a minute without training."""
        try:
            # submitit copies sbatch's stderr to ours at every failure: the error is said once, below
            # (the batch submits as it closes, inside the redirection)
            with contextlib.redirect_stderr(io.StringIO()), own_environment(), self.engine.batch():
                handles = [self.engine.submit(FoldJob(item.config, str(item.run_dir), item.tta)) for item in work]
        except submitit.core.utils.FailedJobError as exc:
            error = sbatch_error(exc)
            if transient(error):
                raise Busy(error) from None
            raise InputError(f"sbatch refused the jobs: {error} (launcher.partition, launcher.account, "
                             "launcher.slurm_extra?); none was submitted; after a fix, --resume submits them") from None
        return self._records(work, handles)

    def refresh(self, records: list[Submission]) -> None:
        """One squeue for these jobs, unless the last look, moments ago, covered them all: a search
        polls each trial's jobs in turn, and one squeue per trial and poll would load the controller."""
        wanted = {r.job_id for r in records}
        if wanted <= self._asked and time.monotonic() - self._looked_at < self.poll_s / 2:
            return
        self._asked, self._listed = wanted, slurm_states(sorted(wanted))
        self._looked_at = time.monotonic()   # once answered: a slow squeue must not make the look stale at once

    def presence(self, record: Submission, handle=None) -> tuple[JobState | None, str]:
        if record.job_id not in self._asked:   # not part of the last look: look again, for it alone
            self.refresh([record])
        if self._listed is None:
            return JobState.UNKNOWN, "squeue did not answer"
        state = self._listed.get(record.job_id)
        if state == "PREEMPTED":
            self._preempted.add(record.job_id)
        elif state is not None:   # requeued (PreemptMode=REQUEUE): its end is judged by its own state
            self._preempted.discard(record.job_id)
        if state in ACTIVE_SLURM_STATES:
            return (JobState.PENDING if state == "PENDING" else JobState.RUNNING), state
        if state is None and record.job_id in self._preempted:   # PreemptMode=CANCEL: preempted, then gone
            return None, "Slurm state PREEMPTED"
        return None, f"Slurm state {state}" if state else "no longer in squeue"

    @classmethod
    def lost(cls, detail: str) -> bool:
        return detail.removeprefix("Slurm state ") in LOST_SLURM_ENDS

    def cancel(self, record: Submission, handle=None) -> None:
        try:
            subprocess.run(["scancel", record.job_id], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def interrupt(self, jobs: list[Submitted]) -> str:
        """Slurm jobs do not need the launcher: they go on, and ``--resume`` watches them again."""
        return f"{len(jobs)} Slurm job(s) go on"


def sbatch_error(exc: Exception) -> str:
    """What sbatch said (submitit's error holds its whole stderr): its last line, without the prefix."""
    return said(exc, last=True, limit=10_000, empty="no message").removeprefix("sbatch: error: ")[:300]


def transient(error: str) -> bool:
    """Whether an sbatch error is one of a busy or restarting controller, worth another try."""
    return any(words in error.lower() for words in SBATCH_TRANSIENT)


def slurm_problem() -> str | None:
    """None when a Slurm controller answers ``scontrol ping``, else why not (one line)."""
    if shutil.which("scontrol") is None or shutil.which("srun") is None:
        return "Slurm commands (scontrol, srun) are not on PATH"
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():  # scontrol would retry for a minute
        return f"SLURM_CONF={conf} does not exist"
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "Slurm controller not reachable (scontrol ping: no answer within 20 s)"
    out = (p.stdout + p.stderr).strip()
    if p.returncode != 0 or "is UP" not in out:
        return f"Slurm controller not reachable (scontrol ping: {said(out, empty=f'exit status {p.returncode}')})"
    return None


def slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """``{job id: state}`` of the jobs Slurm still lists (array tasks one by one); None if no answer."""
    if not job_ids:
        return {}
    try:
        p = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0 and "Invalid job id" not in p.stderr:
        return None
    return dict(line.split()[:2] for line in p.stdout.splitlines() if len(line.split()) >= 2)


# ----------------------------------------------------------------------------- a job's tasks' files

def task_file(path: str, task: int) -> Path:
    """Task ``task``'s file of a job, from rank 0's (submitit names them ``<job>_<task>_<kind>``)."""
    p = Path(path)
    head, sep, tail = p.name.rpartition("_0_")
    return p.with_name(f"{head}_{task}_{tail}") if sep else p


def _error_of(path: Path) -> str | None:
    """The last line of the exception in a result pickle, None when it holds a result (or none yet)."""
    if not path.exists():
        return None
    try:
        outcome, payload = submitit.core.utils.pickle_load(path)
    except Exception as exc:  # noqa: BLE001 - a pickle being written or unreadable
        return None if time.time() - path.stat().st_mtime < 5 else f"unreadable result pickle ({exc})"
    if outcome != "error":
        return None
    return said(payload, last=True, limit=10_000, empty="error")


def first_failure(record: Submission, since: float | None = None) -> tuple[str, str] | None:
    """(the error, the log) of the task that failed first (earliest error pickle), or None; pickles
    written before ``since`` (a timestamp) are left out."""
    failed = []
    for task in range(max(record.tasks, 1)):
        pickle = task_file(record.result, task)
        with contextlib.suppress(OSError):
            if since is not None and pickle.stat().st_mtime < since:
                continue
        error = _error_of(pickle)
        if error is not None:
            failed.append((pickle.stat().st_mtime, task, error))
    if not failed:
        return None
    _, task, error = min(failed)
    prefix = f"rank {task}: " if record.tasks > 1 else ""
    return prefix + error, str(task_file(record.stderr, task))


def _seconds(stamp: str) -> float | None:
    """A submission's time (ISO 8601, whole seconds) as a timestamp, None when unreadable."""
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- the registry

#: The executor names, declared once: the Literal of ``LauncherConfig.executor``; EXECUTORS maps
#: each to its class.
DECLARED = typing.get_args(typing.get_type_hints(LauncherConfig)["executor"])
EXECUTORS: dict[str, type[Executor]] = {cls.name: cls for cls in (LocalExecutor, SlurmExecutor)}
if set(EXECUTORS) != set(DECLARED):   # a name without a class, or a class nobody can choose
    raise ImportError(f"dist_lc.cv.executors: classes for {sorted(EXECUTORS)}, but LauncherConfig.executor "
                      f"declares {sorted(DECLARED)}")


def executor_class(name: str) -> type[Executor]:
    """The class of a declared executor name, or of an alias of one (as cv.json may hold)."""
    if name in EXECUTORS:
        return EXECUTORS[name]
    for cls in EXECUTORS.values():
        if name in cls.aliases:
            return cls
    raise InputError(f"executor {name!r}: not one of {', '.join(EXECUTORS)}")

