"""Every place `dist-lc cv` touches submitit or Slurm: executors, submission, and a job's state.

The executor is chosen explicitly (submitit would pick Slurm whenever ``srun`` is on PATH), Slurm
jobs are one array capped at ``max_parallel``, their srun kills the other tasks when one fails
(``--kill-on-bad-exit``), and a job's state comes from done.json, its tasks' result pickles and
``squeue``, never from a blocking ``job.result()`` (without accounting a killed job never writes its
pickle).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import submitit
import torch

from lc_common.resources import usable_core_ids, usable_cores

from ..config import LauncherConfig
from .fold import FoldJob
from .plan import DONE, Submission, now

ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                       "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                       "PREEMPTED", "RESV_DEL_HOLD"}


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
        first = out.splitlines()[0] if out else f"exit status {p.returncode}"
        return f"Slurm controller not reachable (scontrol ping: {first[:200]})"
    return None


def local_capacity(launcher: LauncherConfig) -> int:
    """Jobs the local machine runs at once: GPUs (or CPU cores) over what one job takes."""
    if launcher.gpus_per_node:
        return max(1, torch.cuda.device_count() // launcher.gpus_per_node)
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


def make_executor(launcher: LauncherConfig, kind: str, folder: Path, jobs: int):
    """A submitit executor of the kind asked (never guessed), its parameters from the config."""
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=launcher.max_requeues)
        params = {"time": launcher.time_min, "nodes": launcher.nodes, "ntasks_per_node": launcher.tasks_per_node,
                  "cpus_per_task": launcher.cpus_per_task, "job_name": "dist-lc-cv",
                  "signal_delay_s": launcher.signal_delay_s, "setup": list(launcher.setup),
                  "additional_parameters": dict(launcher.slurm_extra),
                  "array_parallelism": launcher.max_parallel or jobs,
                  "srun_args": ["--kill-on-bad-exit=1"]}  # one failed rank ends the job, not a hang
        optional = {"gpus_per_node": launcher.gpus_per_node or None, "partition": launcher.partition,
                    "account": launcher.account, "mem": f"{int(launcher.mem_gb * 1024)}MB" if launcher.mem_gb else None}
    else:
        ex = submitit.LocalExecutor(folder=folder / "%j", max_num_timeout=launcher.max_requeues)
        params = {"timeout_min": launcher.time_min, "tasks_per_node": launcher.tasks_per_node,
                  "signal_delay_s": launcher.signal_delay_s, "setup": list(launcher.setup),
                  "gpus_per_node": launcher.gpus_per_node}
        optional = {}
    ex.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    return ex


def submit(ex, kind: str, work: list[tuple[str, int, dict, str, bool]], tasks: int,
           slot: int | None = None, slots: int = 1) -> list[tuple[Submission, object]]:
    """Submit (point, fold, config, run_dir, tta) items, one array on Slurm; (record, submitit job) pairs.
    A local job runs on its ``slot`` of ``slots`` concurrent ones: its GPUs, or else its cores."""
    cpus = None
    if kind == "local" and slot is not None and ex.parameters.get("gpus_per_node"):
        g = ex.parameters["gpus_per_node"]
        slot %= max(1, torch.cuda.device_count() // g)  # max_parallel above the GPUs: jobs share them
        ex.update_parameters(visible_gpus=tuple(range(slot * g, (slot + 1) * g)))
    elif kind == "local" and slot is not None:
        cpus = cpu_slice(slot, slots)
    if kind == "slurm":
        with ex.batch():
            handles = [ex.submit(FoldJob(config, run_dir, tta)) for _, _, config, run_dir, tta in work]
    else:
        handles = [ex.submit(FoldJob(config, run_dir, tta, cpus)) for _, _, config, run_dir, tta in work]
    stamp = now()
    return [(Submission(point, fold, kind, str(job.job_id), str(job.paths.stderr), str(job.paths.result_pickle),
                        stamp, tasks), job) for (point, fold, *_), job in zip(work, handles)]


# ----------------------------------------------------------------------------- job states

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
    lines = [line for line in str(payload).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "error"


def first_failure(record: Submission) -> tuple[str, str] | None:
    """(the error, the log) of the task that failed first (earliest error pickle), or None."""
    failed = []
    for task in range(max(record.tasks, 1)):
        pickle = task_file(record.result, task)
        error = _error_of(pickle)
        if error is not None:
            failed.append((pickle.stat().st_mtime, task, error))
    if not failed:
        return None
    _, task, error = min(failed)
    prefix = f"rank {task}: " if record.tasks > 1 else ""
    return prefix + error, str(task_file(record.stderr, task))


def _pid_alive(pid: str) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def cancel_local(record: Submission, job=None) -> None:
    """End a local job: SIGINT to its controller, which interrupts its tasks and kills what is left
    a second later (submitit's own cancel, also for a job of an earlier launch known by its pid)."""
    if job is not None:
        job.cancel(check=False)
        return
    if _pid_alive(record.job_id):
        try:
            os.kill(int(record.job_id), signal.SIGINT)
        except (OSError, ValueError):
            pass


def job_status(record: Submission, run_dir: Path, slurm: dict | None, job=None) -> tuple[str, str, str]:
    """("done" | "running" | "pending" | "failed" | "ended" | "unknown", detail, log to read).

    done: done.json exists. running/pending: Slurm lists the job as active (a requeued job is, even
    with an error pickle from an attempt that Slurm's SIGTERM cut short) or its local process lives.
    failed: gone, and a task's result pickle holds an exception (the log is that task's). ended: gone
    without either; the caller turns it into a failure after a grace period (files may lag on a
    network filesystem).
    """
    if (run_dir / DONE).exists():
        return "done", "", record.stderr
    if record.executor == "local":
        if (not job.done()) if job is not None else _pid_alive(record.job_id):
            return "running", "", record.stderr
        gone = "process exited"
    else:
        if slurm is None:
            return "unknown", "squeue did not answer", record.stderr
        state = slurm.get(record.job_id)
        if state in ACTIVE_SLURM_STATES:
            return ("pending" if state == "PENDING" else "running"), state, record.stderr
        gone = f"Slurm state {state}" if state else "no longer in squeue"
    failure = first_failure(record)
    if failure:
        return "failed", f"{gone}: {failure[0]}", failure[1]
    return "ended", gone, record.stderr
