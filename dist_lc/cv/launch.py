"""``dist-lc cv``: cross-validation (and grids) as one multi-task DDP job per (grid point × fold).

    dist-lc cv --config configs/cv5.yaml --out CVDIR [--executor slurm|local] [--set k=v ...]
               [--grid optim.lr=0.001,0.0003 ...] [--no-wait]
    dist-lc cv --out CVDIR --resume        # resubmit only the folds without done.json
    dist-lc report CVDIR                   # (re)build the report, e.g. after --no-wait

Everything is validated before anything is written or submitted: the config of every grid point
(load_config), the folds against the shards' manifest, the launcher section, the output folder
and, for Slurm, that the controller answers. The CV folder's layout: :mod:`dist_lc.cv.plan`; what a
job does: :mod:`dist_lc.cv.fold`.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lc_common.errors import InputError

from ..config import Config, apply_overrides, batch_layout, from_dict, normalized
from . import executors
from .plan import (Plan, Submission, add_submissions, build_points, check_folds, load_plan, now, parse_grid,
                   read_submissions)

POLL_S = {"slurm": 2.0, "local": 0.5}   # between two looks at the jobs (squeue for Slurm; local: cheap)
GRACE_S = {"slurm": 15.0, "local": 2.0}  # a job gone without done.json is failed after this long
TASK_FAILED_GRACE_S = 15.0   # local: a job whose task failed this long ago has its other tasks ended


# ----------------------------------------------------------------------------- building and checking a plan

def check_launcher(cfg: Config, kind: str) -> None:
    lc = cfg.launcher
    if kind == "local" and lc.nodes != 1:
        raise InputError(f"config key 'launcher.nodes': {lc.nodes} needs --executor slurm (the local executor "
                         "has one node)")
    if lc.time_min * 60 <= lc.signal_delay_s + 60:
        raise InputError(f"config: launcher.time_min={lc.time_min} leaves no time before the stop signal "
                         f"(launcher.signal_delay_s={lc.signal_delay_s}): time_min * 60 must exceed "
                         "signal_delay_s + 60")
    try:
        batch_layout(cfg.train, lc.nodes * lc.tasks_per_node)
    except InputError as exc:
        raise InputError(f"{exc} (launcher.nodes × launcher.tasks_per_node)") from None


def check_executor(kind: str) -> None:
    if kind == "slurm":
        problem = executors.slurm_problem()
        if problem:
            raise InputError(f"--executor slurm: {problem}; nothing submitted")


def check_new_out(cv_dir: Path) -> None:
    if (cv_dir / "cv.json").exists():
        raise InputError(f"{cv_dir}: already a CV folder; add --resume to finish it, or choose another --out")
    if cv_dir.exists() and (not cv_dir.is_dir() or any(cv_dir.iterdir())):
        raise InputError(f"{cv_dir}: exists and is not an empty folder nor a CV folder; choose another --out")
    probe = cv_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{cv_dir}: --out cannot be created ({probe} is a file)")


def new_plan(args) -> Plan:
    grid = parse_grid(args.grid)
    points = build_points(args.config, args.set, grid)
    base = from_dict(points[0].config)
    kind = args.executor or base.launcher.executor
    folds = check_folds(base)
    for point in points:
        point.config["launcher"]["executor"] = kind
        check_launcher(from_dict(point.config), kind)
    cv_dir = Path(args.out)
    check_new_out(cv_dir)
    return Plan(cv_dir, points, folds, grid, kind, now())


def resumed_plan(args) -> Plan:
    """The saved plan; only launcher keys (--set launcher.x=...) and --executor may change."""
    if args.config or args.grid:
        raise InputError("--resume takes the config and the grid from the CV folder: drop --config/--grid")
    other = [s for s in args.set if not s.strip().startswith("launcher.")]
    if other:
        raise InputError(f"--resume: only launcher.* keys can be changed, not {other[0]!r}")
    plan = load_plan(args.out)
    for point in plan.points:
        point.config = normalized(apply_overrides(point.config, list(args.set)))
    plan.executor = args.executor or (plan.executor if plan.executor in ("local", "slurm") else "slurm")
    for point in plan.points:
        check_launcher(from_dict(point.config), plan.executor)
    return plan


# ----------------------------------------------------------------------------- launching and watching

@dataclass
class Job:
    """One (grid point, fold) of the plan, from queued to done or failed."""
    point: str
    fold: int
    run_dir: Path
    state: str = "queued"            # queued | pending | running | ended | unknown | done | failed
    detail: str = ""
    log: str = ""                    # the log to read when it failed (its first failed task's)
    submission: Submission | None = None
    handle: object = None            # this launch's submitit Job (local executor: its processes)
    slot: int | None = None          # local executor: the device slot it runs on
    ended_at: float | None = None    # when it was first seen gone without done.json
    task_failed_at: float | None = None  # local: when a task of the still running job was seen failed

    @property
    def label(self) -> str:
        return f"{self.point}/fold{self.fold}" if self.point else f"fold{self.fold}"

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed")

    @property
    def active(self) -> bool:
        return self.submission is not None and not self.final


class Launch:
    """Submits the jobs of a plan and watches them until each one is done or failed."""

    def __init__(self, plan: Plan, todo: list[tuple[str, int]], already_done: int = 0):
        self.plan, self.already_done = plan, already_done
        self.cfg = from_dict(plan.points[0].config)
        self.kind = plan.executor
        self.jobs = [Job(p, k, plan.run_dir(plan.point(p), k)) for p, k in todo]
        self._ex = None
        self._shown = ("", 0.0)
        self.started = time.monotonic()

    # --- submission

    def capacity(self) -> float:
        lc = self.cfg.launcher
        if self.kind == "slurm":
            return math.inf  # Slurm queues; the array's parallelism carries launcher.max_parallel
        return lc.max_parallel or executors.local_capacity(lc)

    def executor(self):
        if self._ex is None:  # a fresh submitit folder per launch: Slurm job ids may restart at 1
            root = self.plan.cv_dir / "submitit"
            folder = root / f"launch{len(list(root.glob('launch*'))) if root.exists() else 0}"
            self._ex = executors.make_executor(self.cfg.launcher, self.kind, folder, max(len(self.jobs), 1))
        return self._ex

    def start(self, resume: bool) -> None:
        """Keep watching the jobs of an earlier launch that still run (--resume); submit the others."""
        earlier = {(r.point, r.fold): r for r in read_submissions(self.plan.cv_dir)} if resume else {}
        slurm_ids = [r.job_id for r in earlier.values() if r.executor == "slurm"]
        slurm = executors.slurm_states(slurm_ids) if slurm_ids else {}
        for job in self.jobs:
            record = earlier.get((job.point, job.fold))
            status = executors.job_status(record, job.run_dir, slurm)[0] if record else None
            if status in ("running", "pending", "unknown"):
                job.submission, job.state = record, status
                print(f"cv: {job.label} still running as job {record.job_id}: watching it", file=sys.stderr)
        self.submit_queued()

    def submit_queued(self) -> None:
        queued = [j for j in self.jobs if j.state == "queued"]
        room = self.capacity() - sum(j.active for j in self.jobs)
        take = queued if room == math.inf else queued[:max(int(room), 0)]
        if not take:
            return
        tasks = self.cfg.launcher.nodes * self.cfg.launcher.tasks_per_node
        for job in take:
            job.run_dir.mkdir(parents=True, exist_ok=True)
        work = [(j.point, j.fold, self.plan.fold_config(self.plan.point(j.point), j.fold), str(j.run_dir),
                 self.cfg.cv.tta) for j in take]
        if self.kind == "slurm":
            self._record(take, executors.submit(self.executor(), self.kind, work, tasks))
            return
        for job, item in zip(take, work):  # local: one at a time, each on its own device slot
            used = {j.slot for j in self.jobs if j.active and j.slot is not None}
            job.slot = min(set(range(int(self.capacity()))) - used, default=0)
            self._record([job], executors.submit(self.executor(), self.kind, [item], tasks, slot=job.slot,
                                                 slots=int(self.capacity())))

    def _record(self, jobs: list[Job], submitted: list[tuple[Submission, object]]) -> None:
        for job, (record, handle) in zip(jobs, submitted):
            job.submission, job.handle, job.state = record, handle, "pending"
        add_submissions(self.plan.cv_dir, [record for record, _ in submitted])

    # --- watching

    def poll(self) -> None:
        watched = [j for j in self.jobs if j.active]
        slurm = executors.slurm_states([j.submission.job_id for j in watched if j.submission.executor == "slurm"])
        clock = time.monotonic()
        for job in watched:
            status, detail, log = executors.job_status(job.submission, job.run_dir, slurm, job.handle)
            if status == "ended":
                job.ended_at = job.ended_at or clock
                if clock - job.ended_at < GRACE_S[job.submission.executor]:
                    continue
                status, detail = "failed", f"{detail} without done.json"
            else:
                job.ended_at = None
            if status == "running" and job.submission.executor == "local":
                self._end_if_a_task_failed(job, clock)
            job.state, job.detail, job.log = status, detail, log
            if status == "failed":
                print(f"cv: {job.label} FAILED (job {job.submission.job_id}: {detail}); log: {log}",
                      file=sys.stderr, flush=True)

    def _end_if_a_task_failed(self, job: Job, clock: float) -> None:
        """What srun's --kill-on-bad-exit does on Slurm: a local job one of whose tasks failed is
        ended after TASK_FAILED_GRACE_S (time for the others to record that they stop because of
        it), so that a task stuck for another reason cannot keep the job, and the CV, waiting."""
        if job.task_failed_at is None:
            if executors.first_failure(job.submission) is not None:
                job.task_failed_at = clock
            return
        if clock - job.task_failed_at >= TASK_FAILED_GRACE_S:
            print(f"cv: {job.label}: a task failed {TASK_FAILED_GRACE_S:.0f} s ago and the job still runs; "
                  f"ending its other tasks", file=sys.stderr, flush=True)
            executors.cancel_local(job.submission, job.handle)
            job.task_failed_at = math.inf   # asked once

    def counts(self, total: int) -> str:
        done = sum(j.state == "done" for j in self.jobs) + self.already_done
        failed = sum(j.state == "failed" for j in self.jobs)
        running = sum(j.state in ("running", "ended") for j in self.jobs)
        queued = sum(not j.final and j.state not in ("running", "ended") for j in self.jobs)
        return f"{done}/{total} done, {running} running, {queued} queued, {failed} failed"

    def show(self, total: int) -> None:
        text, clock = self.counts(total), time.monotonic()
        if text != self._shown[0] or clock - self._shown[1] > 60:
            print(f"cv: {text}  [{_clock(clock - self.started)}]", file=sys.stderr, flush=True)
            self._shown = (text, clock)

    def wait(self, total: int, deadline_s: float) -> bool:
        """Poll until every job is done or failed (True) or the deadline passes (False)."""
        self.started = time.monotonic()
        while True:
            self.poll()
            self.submit_queued()
            self.show(total)
            if all(j.final for j in self.jobs):
                return True
            if time.monotonic() - self.started > deadline_s:
                return False
            time.sleep(POLL_S[self.kind])

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.state == "failed"]

    @property
    def all_done(self) -> bool:
        return all(j.state == "done" for j in self.jobs)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def wait_budget_s(cfg: Config, jobs_count: int, parallel: float) -> float:
    """launcher.wait_min, or enough for every wave of jobs to use all its requeues, plus 30 min."""
    lc = cfg.launcher
    if lc.wait_min:
        return lc.wait_min * 60.0
    waves = math.ceil(jobs_count / min(parallel, lc.max_parallel or math.inf))
    return waves * lc.time_min * 60.0 * (lc.max_requeues + 1) + 1800.0


def run(args) -> int:
    if args.print_config:
        from ..config import describe, load_config

        print(describe(load_config(args.config, args.set) if not args.resume else load_plan(args.out).config))
        return 0
    plan = resumed_plan(args) if args.resume else new_plan(args)
    check_executor(plan.executor)
    keys = [(p.name, k) for p in plan.points for k in plan.folds]
    todo = [(p.name, k) for p in plan.points for k in plan.folds if not plan.is_done(p, k)]
    launch = Launch(plan, todo, already_done=len(keys) - len(todo))
    if args.no_wait and plan.executor == "local" and len(todo) > launch.capacity():
        raise InputError(f"--no-wait with the local executor: {len(todo)} jobs but {launch.capacity()} at once "
                         "(launcher.max_parallel; the local executor has no queue): wait, or raise max_parallel")
    plan.cv_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        plan.save()
    print(f"cv: {len(plan.points)} grid point(s) × {len(plan.folds)} fold(s) in {plan.cv_dir} "
          f"({plan.executor}); {len(todo)} job(s) to run", file=sys.stderr, flush=True)
    launch.start(resume=args.resume)
    if args.no_wait:
        print(f"cv: submitted; later: dist-lc report {plan.cv_dir}", file=sys.stderr)
        return 0
    try:
        finished = launch.wait(len(keys), wait_budget_s(launch.cfg, len(todo), launch.capacity()))
    except KeyboardInterrupt:
        print(f"cv: interrupted; Slurm jobs go on (local ones got the interrupt too): dist-lc cv --out "
              f"{plan.cv_dir} --resume watches them again and reruns the others", file=sys.stderr)
        return 130
    if not finished:
        print(f"cv: wait deadline passed with jobs unfinished (they may still run): dist-lc report "
              f"{plan.cv_dir} or dist-lc cv --out {plan.cv_dir} --resume later", file=sys.stderr)
    return _finish(plan, launch, finished)


def _finish(plan: Plan, launch: Launch, finished: bool) -> int:
    """The report of the finished folds, then the failures again; 0 only when every fold is done."""
    from . import report

    if any(plan.is_done(p, k) for p in plan.points for k in plan.folds):
        print(report.summary_line(report.build(plan.cv_dir)))
    else:
        print("cv: no fold finished; no report", file=sys.stderr)
    for job in launch.failed:
        print(f"cv: {job.label} failed ({job.detail}); log: {job.log}", file=sys.stderr)
    if launch.failed:
        print(f"cv: {len(launch.failed)} job(s) failed; after a fix: dist-lc cv --out {plan.cv_dir} --resume",
              file=sys.stderr)
    return 0 if finished and launch.all_done else 1
