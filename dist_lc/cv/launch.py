"""``dist-lc cv``: cross-validation (and grids) as one multi-task DDP job per (grid point × fold).

    dist-lc cv --config configs/cv5.yaml --out CVDIR [--executor slurm|local] [--set k=v ...]
               [--grid optim.lr=0.001,0.0003 ...] [--no-wait]
    dist-lc cv --out CVDIR --resume        # resubmit only the folds without done.json
    dist-lc report CVDIR                   # (re)build the report, e.g. after --no-wait

Everything is validated before anything is written or submitted: the config of every grid point
(load_config), the folds against the shards' manifest, the launcher section, the output folder
and, for Slurm, that the controller answers. The CV folder's layout: :mod:`dist_lc.cv.plan`; what a
job does: :mod:`dist_lc.cv.fold`; where jobs run: :mod:`dist_lc.cv.executors`.

Stopped by Ctrl-C, SIGTERM or SIGHUP, `dist-lc cv` hands its unfinished jobs to their executor (local
ones are ended within seconds, Slurm ones go on), prints one line and exits with 128 + the signal's
number (130, 143, 129); ``--resume`` watches what still runs and reruns the rest. A signal it was
started ignoring stays ignored (SIGHUP under ``nohup``). Ended by an error instead, it hands them over
the same way before the error is reported.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lc_common.errors import InputError, one_line
from lc_common.locks import held

from ..config import Config, apply_overrides, batch_layout, from_dict, normalized
from ..run_dir import check_output_folder, clear_failures, failure_notes, trainer_of
from ..stopping import SignalHandlers
from . import executors
from .executors import Executor, JobState, Status, Work
from .plan import (JOBS, Plan, Submission, add_submissions, build_points, check_folds, load_plan, now,
                   parse_grid, read_submissions)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)   # Ctrl-C, a scheduler or kill, a closed terminal
LOCK = ".cv.lock"   # held by the launcher that runs the CV folder


# ----------------------------------------------------------------------------- building and checking a plan

def check_launcher(cfg: Config, kind: str) -> None:
    lc = cfg.launcher
    executors.executor_class(kind).check_launcher(lc)
    if lc.gpus_per_node and lc.tasks_per_node != lc.gpus_per_node:
        # fewer tasks leave GPUs idle; more put two ranks on one GPU, which NCCL refuses once the job runs
        raise InputError(f"config: launcher.tasks_per_node={lc.tasks_per_node} with launcher.gpus_per_node="
                         f"{lc.gpus_per_node}: each rank trains on one GPU; set them equal")
    if lc.time_min * 60 <= lc.signal_delay_s + 60:
        raise InputError(f"config: launcher.time_min={lc.time_min} leaves no time before the stop signal "
                         f"(launcher.signal_delay_s={lc.signal_delay_s}): time_min * 60 must exceed "
                         "signal_delay_s + 60")
    try:
        batch_layout(cfg.train, lc.nodes * lc.tasks_per_node)
    except InputError as exc:
        raise InputError(f"{exc} (launcher.nodes × launcher.tasks_per_node)") from None


def check_executor(kind: str) -> None:
    problem = executors.executor_class(kind).problem()
    if problem:
        raise InputError(f"--executor {kind}: {problem}; nothing submitted")


def check_new_out(cv_dir: Path) -> None:
    if (cv_dir / "cv.json").exists():
        raise InputError(f"{cv_dir}: already a CV folder; add --resume to finish it, or choose another --out")
    if cv_dir.exists() and (not cv_dir.is_dir() or any(cv_dir.iterdir())):
        raise InputError(f"{cv_dir}: exists and is not an empty folder nor a CV folder; choose another --out")
    check_output_folder(cv_dir, "--out")


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
    # --executor, else a launcher.executor given now, else the plan's (cv_array.sbatch's: Slurm)
    given = any(s.strip().startswith("launcher.executor=") for s in args.set)
    plan.executor = args.executor or (plan.config.launcher.executor if given else
                                      executors.executor_class(plan.executor).name)
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
    state: JobState = JobState.QUEUED
    detail: str = ""
    log: str = ""                    # the log to read when it failed (its first failed task's)
    submission: Submission | None = None
    executor: Executor | None = None  # the one running it (a job of an earlier launch: of its kind)
    handle: object = None            # this launch's handle on it (none for a job of an earlier launch)
    ended_at: float | None = None    # when it was first seen gone without done.json
    end_detail: str = ""             # what its executor said then (Slurm lists an ended job's state only a while)
    task_failed_at: float | None = None  # when a task of the still running job was seen failed
    resubmitted: bool = False        # submitted again after its job was lost (once at most)

    @property
    def label(self) -> str:
        return f"{self.point}/fold{self.fold}" if self.point else f"fold{self.fold}"

    @property
    def final(self) -> bool:
        return self.state.final

    @property
    def active(self) -> bool:
        return self.submission is not None and not self.final


class Stopped(BaseException):
    """The launcher was asked to stop by a signal (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum   # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class StopRequests(SignalHandlers):
    """While open, the first of STOP_SIGNALS raises :class:`Stopped` in the main thread, at once, or
    at the end of a ``held()`` block (a job submitted inside is always recorded first). Later ones
    are ignored: the clean-up they would cut short is bounded, and so are all once ``ending`` is set
    (the launcher ends on an error and cleans up). One the launcher was started ignoring stays ignored
    (:meth:`SignalHandlers.handler_for`). The previous handlers are back on exit."""
    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.signum: int | None = None
        self.ending = False
        self._raised, self._holding, self._previous = False, 0, {}

    def _handler(self, signum, frame) -> None:
        if self.signum is None and not self.ending:
            self.signum = signum
            if not self._holding:
                self._raise()

    def _raise(self) -> None:
        self._raised = True
        raise Stopped(self.signum)

    def raise_pending(self) -> None:
        """Raise the stop request that arrived in a ``held()`` block that an exception left."""
        if self.signum is not None and not self._raised:
            self._raise()

    def _released(self) -> None:
        self.raise_pending()


class Launch:
    """Submits the jobs of a plan and watches them until each one is done or failed."""

    def __init__(self, plan: Plan, todo: list[tuple[str, int]], already_done: int = 0):
        self.plan, self.already_done = plan, already_done
        self.cfg = from_dict(plan.points[0].config)
        self.executor = self._executor(plan.executor, max(len(todo), 1))
        self._others: dict[str, Executor] = {}   # earlier launches' jobs of other kinds (--resume)
        self.jobs = [Job(p, k, plan.run_dir(plan.point(p), k)) for p, k in todo]
        self.stops = StopRequests()
        self._shown = ("", 0.0)
        self.started = time.monotonic()
        self.extra_wait_s = 0.0   # added to the wait budget by each job submitted again

    def _executor(self, kind: str, jobs: int) -> Executor:
        """A fresh submitit folder per launch: Slurm job ids may restart at 1."""
        root = self.plan.cv_dir / "submitit"
        folder = root / f"launch{len(list(root.glob('launch*'))) if root.exists() else 0}"
        return executors.executor_class(kind)(self.cfg.launcher, folder, jobs)

    def executor_of(self, record: Submission) -> Executor:
        if record.executor == self.executor.name:
            return self.executor
        if record.executor not in self._others:
            self._others[record.executor] = self._executor(record.executor, 1)
        return self._others[record.executor]

    def capacity(self) -> float:
        return self.executor.capacity()

    # --- submission

    def check_resumable(self) -> None:
        """Before anything is watched, ended or submitted: the jobs of an earlier launch that still run
        can be watched with the launcher keys as now given, and no fold to run is being trained by a
        job this folder does not list (an array task of slurm/cv_array.sbatch, which a resume would
        run twice). A refusal leaves them all running."""
        earlier = {(r.point, r.fold): r for r in read_submissions(self.plan.cv_dir)}
        for record in earlier.values():
            problem = self.executor_of(record).refuses(record)
            if problem:
                raise InputError(f"--resume: {record.point + '/' if record.point else ''}fold{record.fold}: "
                                 f"{problem}; resume with the launcher keys it started with, or once it has ended")
        for job in self.jobs:
            trainer = trainer_of(job.run_dir)
            record = earlier.get((job.point, job.fold))
            if not trainer or (record is not None and self.executor_of(record).presence(record)[0] is not None):
                continue   # free, or held by its job of an earlier launch, watched again
            raise InputError(f"--resume: {job.label}: {job.run_dir} is held by a training that no job of this folder "
                             f"runs ({trainer}; an array task of slurm/cv_array.sbatch?); wait for it to end, or end it")

    def start(self, resume: bool) -> None:
        """Keep watching the jobs of an earlier launch that still run (--resume); submit the others."""
        earlier = {(r.point, r.fold): r for r in read_submissions(self.plan.cv_dir)} if resume else {}
        mine = [j for j in self.jobs if (j.point, j.fold) in earlier]
        for job in mine:
            job.submission = earlier[(job.point, job.fold)]
            job.executor = self.executor_of(job.submission)
        for job, status in zip(mine, self.statuses(mine)):
            if status.state.live:
                job.state = status.state
                job.executor.adopt(job.submission)
                print(f"cv: {job.label} still running as job {job.submission.job_id}: watching it", file=sys.stderr)
            else:
                job.submission = job.executor = None
        self.submit_queued()

    def submit_queued(self) -> None:
        queued = [j for j in self.jobs if j.state is JobState.QUEUED]
        active = sum(j.active for j in self.jobs)
        room = self.capacity() - active
        limit = self.cfg.launcher.max_parallel
        if room == math.inf and limit:   # Slurm: the first array's throttle carries max_parallel; a job
            again = [j for j in queued if j.resubmitted]   # submitted again is outside it, so waits its turn
            queued = [j for j in queued if not j.resubmitted] + again[:max(limit - active, 0)]
        take = queued if room == math.inf else queued[:max(int(room), 0)]
        if not take:
            return
        for job in take:
            job.run_dir.mkdir(parents=True, exist_ok=True)
            clear_failures(job.run_dir)   # an earlier launch's notes would be read as this job's
        work = [Work(j.point, j.fold, self.plan.fold_config(self.plan.point(j.point), j.fold), j.run_dir,
                     self.cfg.cv.tta) for j in take]
        for tries, wait_s in enumerate((*executors.SUBMIT_BACKOFF_S, None), start=1):
            try:
                return self._submit(take, work)
            except executors.Busy as busy:
                self.stops.raise_pending()   # nothing of these jobs was submitted: a stop ends it now
                if wait_s is None:
                    raise InputError(f"the scheduler refused the jobs {tries} times in a row: {busy} (busy or down); "
                                     "none was submitted; once it answers, --resume submits them") from None
                print(f"cv: the scheduler did not take the jobs ({busy}); trying again in {wait_s:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(wait_s)   # a stop signal ends the launcher here

    def _submit(self, take: list[Job], work: list[Work]) -> None:
        with self.stops.held():   # a stop request waits until what is submitted is recorded
            submitted = self.executor.submit(work)
            self._record(submitted)
            for job, (record, handle) in zip(take, submitted):
                job.submission, job.executor, job.handle, job.state = record, self.executor, handle, JobState.PENDING

    def _record(self, submitted: list) -> None:
        """Add the jobs just submitted to jobs.json, or cancel them when it cannot be written: a job
        missing there would run on unwatched, and --resume would submit its fold again beside it."""
        try:
            add_submissions(self.plan.cv_dir, [record for record, _ in submitted])
        except Exception:
            print(f"cv: {self.plan.cv_dir / JOBS} not written: cancelling the {len(submitted)} job(s) just "
                  "submitted", file=sys.stderr, flush=True)
            self.executor.cancel_all(submitted)
            raise

    # --- watching

    def statuses(self, jobs: list[Job]) -> list[Status]:
        """Each job's status, from one look per executor."""
        for ex in {id(j.executor): j.executor for j in jobs}.values():
            ex.refresh([j.submission for j in jobs if j.executor is ex])
        return [j.executor.status(j.submission, j.run_dir, j.handle) for j in jobs]

    def poll(self) -> None:
        watched = [j for j in self.jobs if j.active]
        statuses = self.statuses(watched)
        clock = time.monotonic()
        for job, status in zip(watched, statuses):
            self._update(job, status, clock)

    def _update(self, job: Job, status: Status, clock: float) -> None:
        if status.state is JobState.ENDED:
            if job.ended_at is None:
                job.ended_at, job.end_detail = clock, status.detail
            if clock - job.ended_at < job.executor.gone_grace_s:
                return
            if self._resubmit_lost(job):
                return
            status = Status(JobState.FAILED, f"{job.end_detail} without done.json", status.log)
        else:
            job.ended_at = None
        if status.state is JobState.RUNNING:
            self._end_if_a_task_failed(job, clock)
        job.state, job.detail, job.log = status.state, status.detail, status.log
        if status.state is JobState.FAILED:
            print(f"cv: {job.label} FAILED (job {job.submission.job_id}: {status.detail}); log: {status.log}",
                  file=sys.stderr, flush=True)

    def _resubmit_lost(self, job: Job) -> bool:
        """A job whose every task vanished without done.json, an error or a failure note (its node lost,
        its processes killed from outside) is queued once more, as --resume would do: its fold resumes
        from its last checkpoint. Not one ended on purpose (scancel, the time limit), not while a
        training still holds its run folder (tasks that outlived their controller), and only once."""
        if job.resubmitted or failure_notes(job.run_dir) or not job.executor.lost(job.end_detail):
            return False
        trainer = trainer_of(job.run_dir)
        if trainer:
            print(f"cv: {job.label}: job {job.submission.job_id} is gone ({job.end_detail}) but a training still "
                  f"holds {job.run_dir} ({trainer}): not submitted again", file=sys.stderr, flush=True)
            return False
        print(f"cv: {job.label}: job {job.submission.job_id} was lost ({job.end_detail}, without done.json or an "
              "error); submitting it once more (it resumes from its last checkpoint)", file=sys.stderr, flush=True)
        job.state, job.submission, job.executor, job.handle = JobState.QUEUED, None, None, None
        job.ended_at = job.task_failed_at = None
        job.resubmitted = True
        self.extra_wait_s += resubmission_wait_s(self.cfg)
        return True

    def _end_if_a_task_failed(self, job: Job, clock: float) -> None:
        """Where the executor does not do it itself (srun's --kill-on-bad-exit), a job one of whose
        tasks failed is ended after its executor's task_failed_grace_s (time for the others to record
        that they stop because of it), so that a task stuck for another reason cannot keep the job,
        and the CV, waiting."""
        grace = job.executor.task_failed_grace_s
        if grace is None or job.task_failed_at == math.inf:
            return
        if job.executor.first_failure(job.submission) is None:   # (again: a requeued attempt's tasks run)
            job.task_failed_at = None
            return
        if job.task_failed_at is None:
            job.task_failed_at = clock
            return
        if clock - job.task_failed_at >= grace:
            print(f"cv: {job.label}: a task failed {grace:.0f} s ago and the job still runs; "
                  f"ending its other tasks", file=sys.stderr, flush=True)
            job.executor.cancel(job.submission, job.handle)
            job.task_failed_at = math.inf   # asked once

    def counts(self, total: int) -> str:
        done = sum(j.state is JobState.DONE for j in self.jobs) + self.already_done
        failed = sum(j.state is JobState.FAILED for j in self.jobs)
        running = sum(j.state in (JobState.RUNNING, JobState.ENDED) for j in self.jobs)
        queued = sum(not j.final and j.state not in (JobState.RUNNING, JobState.ENDED) for j in self.jobs)
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
            if time.monotonic() - self.started > deadline_s + self.extra_wait_s:
                return False
            time.sleep(self.executor.poll_s)

    def interrupt(self) -> str:
        """The launcher stops: each executor ends or leaves its unfinished jobs; what happened to them."""
        active = [j for j in self.jobs if j.active]
        said = [ex.interrupt([(j.submission, j.handle) for j in active if j.executor is ex])
                for ex in {id(j.executor): j.executor for j in active}.values()]
        return "; ".join(said) or "no job was running"

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.state is JobState.FAILED]

    @property
    def all_done(self) -> bool:
        return all(j.state is JobState.DONE for j in self.jobs)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def wait_budget_s(cfg: Config, jobs_count: int, parallel: float) -> float:
    """launcher.wait_min, or enough for every wave of jobs to use all its requeues, plus 30 min."""
    lc = cfg.launcher
    if lc.wait_min:
        return lc.wait_min * 60.0
    at_once = min(parallel, lc.max_parallel or math.inf)
    waves = math.ceil(jobs_count / at_once) if math.isfinite(at_once) else min(jobs_count, 1)  # Slurm: one
    return waves * lc.time_min * 60.0 * (lc.max_requeues + 1) + 1800.0


def resubmission_wait_s(cfg: Config) -> float:
    """What a job submitted again adds to the computed wait budget: one job's run with all its
    requeues (nothing when launcher.wait_min bounds the wait: the user's bound stands)."""
    lc = cfg.launcher
    return 0.0 if lc.wait_min else lc.time_min * 60.0 * (lc.max_requeues + 1)


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
    if args.no_wait and len(todo) > launch.capacity():
        raise InputError(f"--no-wait with the {plan.executor} executor: {len(todo)} jobs but {launch.capacity()} at "
                         "once (launcher.max_parallel; it has no queue): wait, or raise max_parallel")
    plan.cv_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        plan.save()
    # one launcher per CV folder: a second would submit the queued folds again (after cv.json: a
    # folder holding only the lock would read as someone else's)
    with held(plan.cv_dir / LOCK, f"{plan.cv_dir}: another dist-lc cv ({{holder}}) is running this CV; "
              "wait for it, or stop it and add --resume"):
        return _launch(args, plan, launch, keys, todo)


def _launch(args, plan: Plan, launch: Launch, keys: list, todo: list) -> int:
    if args.resume:
        launch.check_resumable()
    print(f"cv: {len(plan.points)} grid point(s) × {len(plan.folds)} fold(s) in {plan.cv_dir} "
          f"({plan.executor}); {len(todo)} job(s) to run", file=sys.stderr, flush=True)
    with launch.stops:   # still open while the jobs are ended: a second signal cannot cut that short
        try:
            launch.start(resume=args.resume)
            if args.no_wait:
                print(f"cv: submitted; later: dist-lc report {plan.cv_dir}", file=sys.stderr)
                return 0
            finished = launch.wait(len(keys), wait_budget_s(launch.cfg, len(todo), launch.capacity()))
            if not finished:   # as a stop: local jobs would run on with nothing watching them
                ended = hand_over(launch.stops, launch.interrupt)
                print(f"cv: wait deadline passed with jobs unfinished; {ended}: dist-lc report {plan.cv_dir} "
                      f"reports the folds done, dist-lc cv --out {plan.cv_dir} --resume watches the jobs still "
                      "running and reruns the others", file=sys.stderr, flush=True)
        except Stopped as stop:
            print(f"cv: stopped by {stop.signal_name}; {launch.interrupt()}: dist-lc cv --out {plan.cv_dir} "
                  "--resume watches the jobs still running and reruns the others", file=sys.stderr, flush=True)
            return stop.exit_status
        except BaseException:   # local jobs would run on with nothing watching them; the error follows
            print(f"cv: ended by the error below; {hand_over(launch.stops, launch.interrupt)}: after a fix, dist-lc cv --out "
                  f"{plan.cv_dir} --resume watches the jobs still running and reruns the others",
                  file=sys.stderr, flush=True)
            raise
    return _finish(plan, launch, finished)


def hand_over(stops: StopRequests, interrupt) -> str:
    """``interrupt()`` (a launch's or a search's) for a launcher that an error ends: neither a stop
    request nor a failure of its own may cut it short or hide that error."""
    stops.ending = True
    try:
        return interrupt()
    except Exception as exc:  # noqa: BLE001 - the first error is the one to report
        return f"its jobs could not be ended ({one_line(exc)})"


def _finish(plan: Plan, launch: Launch, finished: bool) -> int:
    """The report of the finished folds, then the failures again; 0 only when every fold is done."""
    from . import report

    error = None
    if any(plan.is_done(p, k) for p in plan.points for k in plan.folds):
        try:
            print(report.summary_line(report.build(plan.cv_dir)))
        except InputError as exc:   # a damaged fold file: the failed jobs below still need saying
            error = exc
    else:
        print("cv: no fold finished; no report", file=sys.stderr)
    for job in launch.failed:
        print(f"cv: {job.label} failed ({job.detail}); log: {job.log}", file=sys.stderr)
    if launch.failed:
        print(f"cv: {len(launch.failed)} job(s) failed; after a fix: dist-lc cv --out {plan.cv_dir} --resume",
              file=sys.stderr)
    if error is not None:
        raise error   # its one line last, and the exit status of bad input
    return 0 if finished and launch.all_done else 1
