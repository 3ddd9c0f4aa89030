"""What runs inside one CV job (one grid point × fold), on every task of it.

:func:`run_fold`, on each of the job's ``nodes × tasks_per_node`` ranks:

1. ``train(cfg, run_dir)`` with ``data.fold = k`` (DDP over the job's tasks; resumes from
   ``run_dir/checkpoints/last.pt`` when a previous attempt left one);
2. if a stop signal cut training short, the tasks agree on it and leave (see below);
3. otherwise the fold's ``best.pt`` predicts its held-out fold (``oof.csv``) and the test tiles
   (``test.csv``), over all the job's ranks (cv.tta → the 8 flips/rotations);
4. rank 0 writes ``done.json`` last, atomically: **a fold is finished iff its run dir holds
   done.json**. Everything the report needs is in the run dir.

Stops, requeues, resubmission. ``train`` replaces submitit's SIGUSR2 handler by its own (stop all
ranks at a step boundary, keep last.pt) for as long as it trains, so the job records which signals
arrived (:class:`SignalLog`) and, after ``train`` returns early:

* SIGUSR2 (submitit's time-limit / preemption signal): rank 0 calls submitit's own handler, which
  calls :meth:`FoldJob.checkpoint <dist_lc.cv.job.FoldJob.checkpoint>` (a resubmission of the same
  callable) and requeues the job (``scontrol requeue``, or exit 144 under the local executor; a
  time-out counts against ``launcher.max_requeues``, a preemption does not). The other ranks wait
  for it at a barrier, then leave with status 0, so that srun's ``--kill-on-bad-exit`` cannot cut
  rank 0's requeue short.
* SIGTERM (Slurm ends the job: ``scontrol requeue``, ``scancel``, preemption by requeue): every rank
  exits without a result; Slurm either reruns the job (which resumes) or the launcher sees it gone.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import submitit
import torch
import torch.distributed as dist

from lc_common.atomic import write_csv_atomic, write_json_atomic
from lc_common.errors import InputError
from shard_tools.manifest import load_manifest

from .. import distributed, pixel_metrics
from ..config import Config, from_dict
from ..predict import gathered_table, predict
from ..metrics import SCORED_NAMES
from ..train import TrainResult, train
from .plan import CONFUSION, DONE, OOF, TEST, load_plan, now

STOPPED_EXIT = 0   # a task that leaves after a stop signal, without a result (0: srun must not kill the others)


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


def fold_summary(trained: TrainResult) -> dict:
    """Best epoch, best validation KL, final train loss, epochs, why training ended and its time."""
    return {"fold": trained.config.data.fold, "epochs": trained.epochs_planned, "epochs_done": trained.epochs_done,
            "stop_reason": trained.stop_reason,
            "best_epoch": trained.best_epoch, "best_val_kl": trained.best_val_kl,
            "final_train_loss": trained.final_train_loss, "train_s": trained.train_s}


def has_test_shards(shards) -> bool:
    return bool(load_manifest(shards).shards("test"))


def predict_fold(trained: TrainResult, run_dir: Path, tta: bool) -> dict:
    """oof.csv (held-out fold) and test.csv from the fold's best.pt, on all ranks; files on rank 0.

    The predictions of the validation that made best.pt, when this call of training ran it, are
    taken as the out-of-fold table instead of predicting the same tiles with the same weights
    again (not with TTA, which validation does not use)."""
    cfg, held = trained.config, trained.best_held_out   # the resolved config: the micro-batch auto chose
    best = [run_dir / "checkpoints" / "best.pt"]
    common = {"tta": tta, "batch_size": cfg.train.micro_batch_size, "workers": cfg.data.workers,
              "device_pref": cfg.train.device, "wait_timeout_s": cfg.data.wait_timeout_s}
    started = time.perf_counter()
    reuse = held is not None and not tta
    if reuse:
        table = gathered_table(held.keys, held.props)
        oof = None if table is None else (table, held.matrix)
    else:
        oof = predict(best, cfg.data.shards, f"fold:{cfg.data.fold}", with_confusion=True, **common)
    # read by rank 0 for all: a rank whose read differed would skip the test pass its peers wait in
    has_test = distributed.on_main(has_test_shards, cfg.data.shards)
    test = predict(best, cfg.data.shards, "test", **common) if has_test else None
    if oof is None:   # not rank 0
        return {"predict_s": time.perf_counter() - started}
    table, matrix = oof
    write_csv_atomic(run_dir / OOF, table)
    write_json_atomic(run_dir / CONFUSION, {"classes": list(SCORED_NAMES), "rows": "true", "matrix": matrix.tolist()})
    if test is not None:
        write_csv_atomic(run_dir / TEST, test)
    return {"oof_tiles": len(table), "oof_from": f"validation of epoch {held.epoch}" if reuse else "best.pt",
            "test_tiles": len(test) if test is not None else 0,
            "pixel": pixel_metrics.summary(matrix), "predict_s": time.perf_counter() - started}


def run_fold(cfg: Config, run_dir, tta: bool = False) -> dict:
    """Train, then predict and mark the fold done; ``{"status": "stopped", ...}`` after a stop signal.

    Every task of the job calls this, inside the process group its caller owns.
    """
    run_dir = Path(run_dir)
    started_at = process_age_s()   # interpreter start, imports, the executor's own set-up
    with SignalLog() as signals:
        trained = train(cfg, run_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    usr2, term = _agree([float(signal.SIGUSR2 in signals.received), float(signal.SIGTERM in signals.received)])
    if trained.stopped:
        return {"status": "stopped", "signal": "USR2" if usr2 or not term else "TERM", "rank": rank,
                "epochs_done": trained.epochs_done}
    result = {"status": "done", "rank": rank, **predict_fold(trained, run_dir, tta)}
    if rank == 0:
        timeline = {"process_start_s": started_at, **dataclasses.asdict(trained.timing),
                    "predict_s": result["predict_s"], "job_s": process_age_s()}
        result.update(fold_summary(trained), tta=tta, job_id=_job_id(),
                      timeline=timeline,
                      world_size=dist.get_world_size() if dist.is_initialized() else 1,
                      threads=torch.get_num_threads(), finished=now())
        write_json_atomic(run_dir / DONE, result)
    return result


def process_age_s() -> float:
    """Seconds since this process started (from /proc: the interpreter's start-up included)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _job_id() -> str | None:
    if os.environ.get("SUBMITIT_EXECUTOR"):
        return str(submitit.JobEnvironment().job_id)
    return os.environ.get("SLURM_JOB_ID")


def run_job(job) -> dict:
    """The work of a :class:`~dist_lc.cv.job.FoldJob` on one task: its share of the machine, the
    process group, the fold; after a stop signal, :func:`_leave`."""
    forget_earlier_attempt()
    if job.cpus:  # the local executor's share of the machine; threads and loader workers inherit it
        os.sched_setaffinity(0, job.cpus)
    requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
    cfg = from_dict(job.config)
    with distributed.process_group(job_device(cfg), cfg.train.dist_timeout_s) as group:
        if job.gpu_share and group.device.type == "cuda":
            # jobs sharing a GPU: each allocates at most its share, so micro_batch_size auto fits it
            # and a job that outgrows it fails alone instead of starving the others; on this rank's
            # own GPU only (setting it for another would create a CUDA context there)
            torch.cuda.set_per_process_memory_fraction(job.gpu_share, group.device)
        result = run_fold(cfg, job.run_dir, job.tta)
        if result["status"] == "stopped":
            _leave(result, requeue)   # the other ranks wait for rank 0's requeue in the group
    return result


def forget_earlier_attempt() -> None:
    """Remove this task's result pickle of the job's attempt before a requeue: the requeued attempt
    runs with the same files, and a peer of rank 0 that failed when rank 0 left a collective to
    requeue left an error there, which the launcher would read as this attempt's failure (and end
    it). Until this task starts, the launcher may see it; it forgets a failure gone at its next look."""
    if os.environ.get("SUBMITIT_EXECUTOR"):
        Path(submitit.JobEnvironment().paths.result_pickle).unlink(missing_ok=True)


def job_device(cfg: Config) -> str:
    """The device preference of a job: one that holds GPUs (``launcher.gpus_per_node``) trains on
    them, since ``auto`` would fall back to the CPU, unnoticed and at a fraction of the speed, under a
    torch without CUDA or a driver that does not match."""
    if not cfg.launcher.gpus_per_node or cfg.train.device != "auto":
        return cfg.train.device
    if not torch.cuda.is_available():
        built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise InputError(f"config key 'launcher.gpus_per_node' is {cfg.launcher.gpus_per_node} but this job "
                         f"sees no CUDA device (torch {torch.__version__}, {built}): install torch for the "
                         "nodes' CUDA in the jobs' environment, or set launcher.gpus_per_node=0")
    return "cuda"


def _leave(result: dict, requeue) -> None:
    """Rank 0 requeues (after USR2) while the others wait at a barrier; then every rank exits
    without a result pickle (so the job is not marked finished)."""
    print(f"stopped by SIG{result['signal']} after epoch {result['epochs_done']}", file=sys.stderr, flush=True)
    code = STOPPED_EXIT
    if result["signal"] == "USR2" and result["rank"] == 0 and callable(requeue):
        try:
            requeue(signal.SIGUSR2, None)  # FoldJob.checkpoint(), requeue, then sys.exit; raises if out of timeouts
        except SystemExit as exc:
            code = exc.code
    if dist.is_initialized():
        dist.barrier()
    sys.exit(code)


def run_array_fold(cv_dir: Path, fold: int) -> dict:
    """One array task of slurm/cv_array.sbatch (every srun task): the fold of the folder's plan."""
    plan = load_plan(cv_dir)
    if fold not in plan.folds:
        raise InputError(f"{cv_dir}: fold {fold} is not in the plan's cv.folds {plan.folds}")
    point = plan.points[0]
    cfg = from_dict(plan.fold_config(point, fold))
    with distributed.process_group(cfg.train.device, cfg.train.dist_timeout_s):
        return run_fold(cfg, plan.run_dir(point, fold), cfg.cv.tta)
