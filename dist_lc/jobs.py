"""One CV job, and every place `dist-lc cv` touches submitit or Slurm.

A job is one (grid point, fold). Every task of it (one per device, ``nodes × tasks_per_node``)
runs :func:`run_fold`:

1. ``train(cfg, run_dir)`` with ``data.fold = k`` (DDP over the job's tasks; resumes from
   ``run_dir/checkpoints/last.pt`` when a previous attempt left one);
2. if a stop signal cut training short, the tasks agree on it and leave (see below);
3. otherwise the fold's ``best.pt`` predicts its held-out fold (``oof.csv``) and the test tiles
   (``test.csv``), over all the job's ranks (cv.tta → the 8 flips/rotations);
4. rank 0 writes ``done.json`` last, atomically: **a fold is finished iff its run dir holds
   done.json**. Everything the report needs is in the run dir.

Stops, requeues, resubmission. ``train`` replaces submitit's SIGUSR2 handler by its own (stop all
ranks at a step boundary, keep last.pt), so the job records which signals arrived
(:class:`SignalLog`) and, after ``train`` returns early:

* SIGUSR2 (submitit's time-limit / preemption signal): rank 0 calls submitit's own handler, which
  calls :meth:`FoldJob.checkpoint` (a resubmission of the same callable), requeues the job
  (``scontrol requeue``, or exit 144 under the local executor; a time-out counts against
  ``launcher.max_requeues``, a preemption does not); the other ranks exit. The next attempt
  resumes from last.pt.
* SIGTERM (Slurm ends the job: ``scontrol requeue``, ``scancel``, preemption by requeue): every rank
  exits without a result; Slurm either reruns the job (which resumes) or the launcher sees it gone.

Launcher side (:func:`make_executor`, :func:`submit`, :func:`job_status`): the executor is chosen
explicitly (submitit would pick Slurm whenever ``srun`` is on PATH), Slurm jobs are one array capped
at ``max_parallel``, and a job's state comes from done.json, its result pickle and ``squeue``,
never from a blocking ``job.result()`` (without accounting a killed job never writes its pickle).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import submitit
import torch
import torch.distributed as dist

from shard_tools.errors import InputError
from shard_tools.manifest import load_manifest, write_json_atomic

from . import distributed
from .config import Config, LauncherConfig, from_dict
from .predict import predict, write_csv_atomic
from .run_log import read_metrics
from .train import train

DONE, OOF, TEST = "done.json", "oof.csv", "test.csv"
STOPPED_EXIT = 3          # a task that leaves after a stop signal, without a result
ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED",
                       "REQUEUE_HOLD", "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                       "PREEMPTED", "RESV_DEL_HOLD"}


# ----------------------------------------------------------------------------- inside the job

class SignalLog:
    """Which signals reached this process inside the block, whatever Python handler was installed.

    Python writes the number of every signal it handles to the wakeup fd; train() installing its
    own handlers does not change that.
    """

    def __enter__(self):
        self.received: set[int] = set()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        try:
            self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no Python signal handlers run here anyway
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
        try:
            self.received = set(os.read(self._read, 1 << 16))
        except BlockingIOError:
            pass
        os.close(self._read)
        os.close(self._write)
        return False


def _agree(values: list[float]) -> list[float]:
    """Sum over the job's ranks (identity without a process group)."""
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return distributed.all_reduce_sum(values, device)


def epochs_done(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return 0
    return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"])


def fold_summary(cfg: Config, run_dir: Path) -> dict:
    """Best epoch, best validation KL, final train loss (from metrics.csv, rank 0)."""
    rows = read_metrics(run_dir)
    best = min((r for r in rows if r["val_kl"]), key=lambda r: float(r["val_kl"]))  # train.val_every may skip
    return {"fold": cfg.data.fold, "epochs": cfg.train.epochs, "epochs_done": int(rows[-1]["epoch"]),
            "best_epoch": int(best["epoch"]), "best_val_kl": float(best["val_kl"]),
            "final_train_loss": float(rows[-1]["train_loss"]),
            "train_s": sum(float(r["epoch_time_s"]) for r in rows)}


def predict_fold(cfg: Config, run_dir: Path, tta: bool) -> dict:
    """oof.csv (held-out fold) and test.csv from the fold's best.pt, on all ranks; files on rank 0."""
    best = [run_dir / "checkpoints" / "best.pt"]
    common = {"tta": tta, "batch_size": cfg.train.micro_batch_size, "workers": cfg.data.workers,
              "device_pref": cfg.train.device}
    started = time.perf_counter()
    oof = predict(best, cfg.data.shards, f"fold:{cfg.data.fold}", **common)
    has_test = bool(load_manifest(cfg.data.shards).shards("test"))
    test = predict(best, cfg.data.shards, "test", **common) if has_test else None
    if oof is not None:
        write_csv_atomic(oof, run_dir / OOF)
        if test is not None:
            write_csv_atomic(test, run_dir / TEST)
    return {"oof_tiles": len(oof) if oof is not None else None,
            "test_tiles": len(test) if test is not None else 0, "predict_s": time.perf_counter() - started}


def run_fold(cfg: Config, run_dir, tta: bool = False) -> dict:
    """Train, then predict and mark the fold done; ``{"status": "stopped", ...}`` after a stop signal.

    Every task of the job calls this; the process group stays up (the caller tears it down).
    """
    run_dir = Path(run_dir)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    with SignalLog() as signals:
        train(cfg, run_dir)
    for sig, handler in handlers.items():  # submitit's handlers back (train's are of no use any more)
        if callable(handler):
            signal.signal(sig, handler)
    rank = dist.get_rank() if dist.is_initialized() else 0
    usr2, term, done = _agree([float(signal.SIGUSR2 in signals.received),
                               float(signal.SIGTERM in signals.received),
                               float(epochs_done(run_dir)) if rank == 0 else 0.0])
    if done < cfg.train.epochs and (usr2 or term):
        return {"status": "stopped", "signal": "USR2" if usr2 else "TERM", "rank": rank, "epochs_done": int(done)}
    result = {"status": "done", "rank": rank, **predict_fold(cfg, run_dir, tta)}
    if rank == 0:
        result.update(fold_summary(cfg, run_dir), tta=tta, job_id=_job_id(),
                      world_size=dist.get_world_size() if dist.is_initialized() else 1,
                      finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_json_atomic(run_dir / DONE, result)
    return result


def _job_id() -> str | None:
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return str(submitit.JobEnvironment().job_id)
    return os.environ.get("SLURM_JOB_ID")


class FoldJob(submitit.helpers.Checkpointable):
    """The submitit callable of one CV job (every task runs it)."""

    def __init__(self, config: dict, run_dir: str, tta: bool = False):
        self.config, self.run_dir, self.tta = config, str(run_dir), tta

    def __call__(self) -> dict:
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
        try:
            result = run_fold(from_dict(self.config), self.run_dir, self.tta)
        finally:
            distributed.teardown()
        if result["status"] == "stopped":
            self._leave(result, requeue)
        return result

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called on rank 0 only: resubmit this same callable; training resumes from last.pt."""
        print(f"checkpoint: {self.run_dir} will resume from last.pt", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    @staticmethod
    def _leave(result: dict, requeue) -> None:
        print(f"stopped by SIG{result['signal']} after epoch {result['epochs_done']}", file=sys.stderr, flush=True)
        if result["signal"] == "USR2" and result["rank"] == 0 and callable(requeue):
            requeue(signal.SIGUSR2, None)  # checkpoint(), requeue, exit; raises if out of timeouts
        sys.exit(STOPPED_EXIT)  # no result pickle: the job is requeued (or Slurm is ending it)


# ----------------------------------------------------------------------------- executors

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
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (launcher.tasks_per_node * launcher.cpus_per_task))


def make_executor(launcher: LauncherConfig, kind: str, folder: Path, jobs: int):
    """A submitit executor of the kind asked (never guessed), its parameters from the config."""
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=launcher.max_requeues)
        params = {"time": launcher.time_min, "nodes": launcher.nodes, "ntasks_per_node": launcher.tasks_per_node,
                  "cpus_per_task": launcher.cpus_per_task, "job_name": "dist-lc-cv",
                  "signal_delay_s": launcher.signal_delay_s, "setup": list(launcher.setup),
                  "additional_parameters": dict(launcher.slurm_extra),
                  "array_parallelism": launcher.max_parallel or jobs}
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


@dataclass
class JobRecord:
    """One submission, as kept in ``cv_dir/jobs.json`` (enough to watch it from another process)."""
    point: str
    fold: int
    executor: str
    job_id: str
    stderr: str
    result: str
    submitted: str

    def to_dict(self) -> dict:
        return asdict(self)


def submit(ex, kind: str, work: list[tuple[str, int, dict, str, bool]], gpu_slot: int | None = None):
    """Submit (point, fold, config, run_dir, tta) items: one array on Slurm; returns (records, jobs)."""
    if kind == "local" and gpu_slot is not None and ex.parameters.get("gpus_per_node"):
        g = ex.parameters["gpus_per_node"]
        gpu_slot %= max(1, torch.cuda.device_count() // g)  # max_parallel above the GPUs: jobs share them
        ex.update_parameters(visible_gpus=tuple(range(gpu_slot * g, (gpu_slot + 1) * g)))
    if kind == "slurm":
        with ex.batch():
            jobs = [ex.submit(FoldJob(config, run_dir, tta)) for _, _, config, run_dir, tta in work]
    else:
        jobs = [ex.submit(FoldJob(config, run_dir, tta)) for _, _, config, run_dir, tta in work]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    records = [JobRecord(point, fold, kind, str(job.job_id), str(job.paths.stderr), str(job.paths.result_pickle), now)
               for (point, fold, *_), job in zip(work, jobs)]
    return records, jobs


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


def job_error(record: JobRecord) -> str | None:
    """The last line of the job's exception when its result pickle says it failed, else None."""
    path = Path(record.result)
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


def _pid_alive(pid: str) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, ValueError, IndexError):
        return False


def job_status(record: JobRecord, run_dir: Path, slurm: dict | None, job=None) -> tuple[str, str]:
    """("done" | "running" | "pending" | "failed" | "ended" | "unknown", detail).

    done: done.json exists. running/pending: Slurm lists the job as active (a requeued job is, even
    with an error pickle from an attempt that Slurm's SIGTERM cut short) or its local process lives.
    failed: gone, and its result pickle holds an exception. ended: gone without either; the caller
    turns it into a failure after a grace period (files may lag on a network filesystem).
    """
    if (run_dir / DONE).exists():
        return "done", ""
    if record.executor == "local":
        if (not job.done()) if job is not None else _pid_alive(record.job_id):
            return "running", ""
        gone = "process exited"
    else:
        if slurm is None:
            return "unknown", "squeue did not answer"
        state = slurm.get(record.job_id)
        if state in ACTIVE_SLURM_STATES:
            return ("pending" if state == "PENDING" else "running"), state
        gone = f"Slurm state {state}" if state else "no longer in squeue"
    error = job_error(record)
    return ("failed", f"{gone}: {error}") if error else ("ended", gone)


def cancel(record: JobRecord, job=None) -> None:
    if record.executor == "slurm":
        subprocess.run(["scancel", record.job_id], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    elif job is not None:
        job.cancel(check=False)


# ----------------------------------------------------------------------------- srun entry (cv_array.sbatch)

def main(argv=None) -> int:
    """``python -m dist_lc.jobs prepare|fold``: the job-array path (slurm/cv_array.sbatch)."""
    p = argparse.ArgumentParser(prog="python -m dist_lc.jobs")
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="write cv.json for a one-point CV (idempotent)")
    prep.add_argument("--config", required=True)
    prep.add_argument("--cv-dir", required=True)
    prep.add_argument("--set", action="append", default=[])
    fold = sub.add_parser("fold", help="train + predict one fold under srun (every task)")
    fold.add_argument("--cv-dir", required=True)
    fold.add_argument("--fold", type=int, required=True)
    args = p.parse_args(argv)
    from . import cv

    try:
        if args.command == "prepare":
            cv.prepare_array(args.config, args.set, Path(args.cv_dir))
            return 0
        cfg, run_dir, tta = cv.array_fold(Path(args.cv_dir), args.fold)
        try:
            result = run_fold(cfg, run_dir, tta)
        finally:
            distributed.teardown()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result["status"] == "stopped":  # the batch script requeues itself after a USR2
        print(f"stopped by SIG{result['signal']} after epoch {result['epochs_done']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
