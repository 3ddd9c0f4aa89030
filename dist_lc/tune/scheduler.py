"""Trials as fold jobs: asks the study for trials, runs each as a CV folder through the CV
machinery, reports its scores, prunes it, tells the study how it ended.

* A trial is a :class:`TrialLaunch`: `dist-lc cv`'s :class:`~dist_lc.cv.launch.Launch` over the
  trial's CV folder (one point, the study's folds), whose room is handed out here so that at most
  ``parallel`` jobs run at once across trials; sequential fold order gives a trial one job at a time.
  Every trial submits through one executor, so the local executor's core slices are shared fairly.
* Each poll reads the running folds' metrics.csv and done.json, reports the new steps
  (:mod:`.progress`) and asks the pruner; a pruned or failed trial has its jobs cancelled through
  the executor before the study records it, so that a launcher killed between the two leaves a
  RUNNING trial, continued (and judged again at once) by --resume, never a finished trial with jobs
  still running.
* Resume: every trial the study holds as RUNNING is continued from its CV folder: the cv Launch's
  own resume watches its jobs still running and resubmits the folds without done.json (a trial one
  of whose folds diverged meanwhile is pruned at once instead); its reported steps stay reported.
  Finished trials are never touched, and the trial count is the study's.
"""
from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from lc_common.errors import InputError

from ..config import from_dict
from ..cv import executors
from ..cv.executors import Executor, JobState
from ..cv.launch import Job, Launch, StopRequests, wait_budget_s
from ..cv.plan import Plan
from ..run_dir import diverged
from . import progress
from .settings import Settings, trial_plan
from .study import all_params, reopen

FAILURES_IN_A_ROW = 3   # trials failed one after another: no new trial (a broken setup must not burn the budget)


class TrialLaunch(Launch):
    """A trial's fold jobs: the cv Launch, submitting only as many as the scheduler gives it room for."""
    room = 0

    def capacity(self) -> float:
        return sum(j.active for j in self.jobs) + self.room


@dataclass
class TrialRun:
    trial: optuna.Trial
    plan: Plan
    launch: TrialLaunch
    reported: set[int] = field(default_factory=set)
    values: dict[int, float] = field(default_factory=dict)   # {step: value} as the folds show them now
    judge: bool = False          # ask the pruner at the next poll even without a new step (a resumed trial)
    started: float = field(default_factory=time.monotonic)

    @property
    def number(self) -> int:
        return self.trial.number

    @property
    def active(self) -> list[Job]:
        return [j for j in self.launch.jobs if j.active]

    @property
    def label(self) -> str:
        return f"trial {self.number}"


def mark_infeasible(trial: optuna.Trial) -> None:
    """A violated constraint on a diverged trial. Pruned alone, TPE would rank it by how far it got
    (a trial that diverged late ranks first among pruned ones, and joins the "good" trials when few
    completed); infeasible, it ranks below every complete and pruned trial (Optuna 5's
    ``set_constraint``: 4.x's TPE reads constraints only from a ``constraints_func``)."""
    trial.set_constraint("finite_loss", 1.0)


def describe_params(params: dict) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def say(text: str) -> None:
    print(f"tune: {text}", file=sys.stderr, flush=True)


class Scheduler:
    """Runs the study of a tune folder until it holds ``settings.trials`` finished trials."""

    def __init__(self, settings: Settings, study: optuna.Study, stops: StopRequests):
        self.settings, self.study, self.stops = settings, study, stops
        self.cfg = from_dict(settings.config)
        self.distributions = settings.search_space.distributions()
        self.executor = self._executor()
        self.running: dict[int, TrialRun] = {}
        self.draining: list[tuple[TrialLaunch, list[Job]]] = []   # cancelled jobs until they are gone
        self.failures_in_a_row = 0
        self._shown = ("", 0.0)
        self.started = time.monotonic()
        self.extra_wait_s = 0.0   # finished trials' lost jobs' share of the wait budget

    def _executor(self) -> Executor:
        """One executor for every trial of this launch, in a fresh submitit folder (Slurm job ids may
        restart at 1)."""
        root = self.settings.out / "submitit"
        folder = root / f"launch{len(list(root.glob('launch*'))) if root.exists() else 0}"
        return executors.executor_class(self.settings.executor)(self.cfg.launcher, folder, self.settings.parallel)

    # --- the study's trials

    def count(self) -> int:
        return len(self.study.get_trials(deepcopy=False))

    def can_ask(self) -> bool:
        return not self.gave_up and self.count() < self.settings.trials

    @property
    def gave_up(self) -> bool:
        """Trials failed one after another while the study still owes some: a broken set-up, which no
        new trial would fix."""
        return self.failures_in_a_row >= FAILURES_IN_A_ROW and self.count() < self.settings.trials

    def resume(self) -> None:
        """Continue the trials that an earlier launcher left RUNNING."""
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = reopen(self.study, frozen)
            run = self._open(trial)
            if run is None:
                continue
            run.reported, run.judge = set(frozen.intermediate_values), True
            # a fold that diverged while no launcher watched: the parameters' outcome, judged now (its
            # submission again would clear the note and train it to the same end)
            unwatched = next((j for j in run.launch.jobs if j.state is JobState.QUEUED and diverged(j.run_dir)), None)
            if unwatched is not None:
                with self.stops.held():
                    mark_infeasible(run.trial)
                self.finish(run, TrialState.PRUNED, f"fold{unwatched.fold} diverged while no launcher watched it "
                            f"(its loss is no longer finite); run folder: {unwatched.run_dir}")
                continue
            done = len(run.plan.folds) - len(run.launch.jobs)
            say(f"{run.label} continued ({done} of {len(run.plan.folds)} fold(s) done; "
                f"{describe_params(trial.params)})")

    def _open(self, trial: optuna.Trial) -> TrialRun | None:
        """The trial's CV folder and its launch; a config refused for this trial fails it. Such a
        failure is the parameters' (two keys that no single value breaks), not a broken set-up: it
        does not count among the failures in a row (no job ran, so no log would say why)."""
        try:
            with self.stops.held():
                params = all_params(trial, self.distributions)
            plan = trial_plan(self.settings, trial.number, params)
        except InputError as exc:
            with self.stops.held():
                self.study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number} FAILED: its config is refused ({describe_params(trial.params)}): {exc}")
            return None
        point = plan.points[0]
        todo = [(point.name, k) for k in plan.folds if not plan.is_done(point, k)]
        launch = TrialLaunch(plan, todo, already_done=len(plan.folds) - len(todo))
        launch.executor, launch.stops = self.executor, self.stops   # shared: room, core slices, stop signals
        launch.start(resume=True)   # watches its jobs of an earlier launch; submits nothing (no room yet)
        run = TrialRun(trial, plan, launch)
        self.running[trial.number] = run
        return run

    def ask(self) -> TrialRun | None:
        with self.stops.held():
            trial = self.study.ask(self.distributions)
        run = self._open(trial)
        if run is not None:
            say(f"{run.label} started ({describe_params(trial.params)})")
        return run

    # --- one round

    def busy(self) -> int:
        return sum(len(r.active) for r in self.running.values()) + sum(len(jobs) for _, jobs in self.draining)

    def fill(self) -> None:
        """Submit the running trials' next jobs, oldest trial first, then start new trials, while
        fewer than ``parallel`` jobs run."""
        room = self.settings.parallel - self.busy()
        for run in sorted(self.running.values(), key=lambda r: r.number):
            if room <= 0:
                return
            room -= self._submit(run, room)
        while room > 0 and self.can_ask():
            run = self.ask()
            if run is not None:
                submitted = self._submit(run, room)
                room -= submitted
                if not submitted:
                    return

    def _submit(self, run: TrialRun, room: int) -> int:
        active = len(run.active)
        allowed = room if self.settings.fold_order == "parallel" else max(0, 1 - active)
        run.launch.room = min(room, allowed)
        try:
            run.launch.submit_queued()
        finally:
            run.launch.room = 0
        return len(run.active) - active

    def poll(self) -> None:
        jobs = [j for r in self.running.values() for j in r.launch.jobs if j.active]
        jobs += [j for _, cancelled in self.draining for j in cancelled]
        for executor in {id(j.executor): j.executor for j in jobs}.values():
            executor.refresh([j.submission for j in jobs if j.executor is executor])   # one look for every trial
        for run in sorted(self.running.values(), key=lambda r: r.number):
            run.launch.poll()
            try:
                folds = progress.read_trial(run.plan)
            except InputError as exc:   # one trial's damaged result ends that trial, not the search
                self.finish(run, TrialState.FAIL, f"its folds' results cannot be read: {exc}")
                continue
            new = self._report(run, folds)
            self._judge(run, folds, new or run.judge)
            run.judge = False

    def _report(self, run: TrialRun, folds: list[progress.FoldScores]) -> bool:
        steps = progress.intermediate(folds, self.settings.fold_order, self.settings.steps_per_fold,
                                      self.settings.pruner_warmup)
        run.values = steps
        new = sorted(s for s in steps if s not in run.reported)
        with self.stops.held():   # the journal's lock is never left half-taken by a stop
            for step in new:
                run.trial.report(steps[step], step)
                run.reported.add(step)
        return bool(new)

    def _judge(self, run: TrialRun, folds: list[progress.FoldScores], ask_pruner: bool) -> None:
        failed = run.launch.failed
        if failed:
            job = next((j for j in failed if diverged(j.run_dir)), None)
            if job is not None:   # the parameters' outcome: pruned, and marked infeasible (below)
                with self.stops.held():
                    mark_infeasible(run.trial)
                self.finish(run, TrialState.PRUNED, f"fold{job.fold} diverged (its loss is no longer finite); "
                            f"log: {job.log}")
                return
            job = failed[0]
            self.finish(run, TrialState.FAIL, f"fold{job.fold} failed ({job.detail}); log: {job.log}")
            return
        broken = [f for f in folds if f.done is not None and f.best is None]
        if broken:
            self.finish(run, TrialState.FAIL, f"fold{broken[0].fold}: done.json holds no finite best_val_kl")
            return
        results = progress.fold_results(folds)
        if len(results) == len(folds):
            mean, std = progress.mean_std(results)
            spread = f" ± {std:.4f}" if std is not None else ""
            self.finish(run, TrialState.COMPLETE, f"KL {mean:.4f}{spread} over {len(results)} fold(s)", mean)
            return
        if ask_pruner and run.reported and run.trial.should_prune():
            last = max(run.values)
            self.finish(run, TrialState.PRUNED, f"at step {last}, KL {run.values[last]:.4f} so far "
                        f"({len(results)} of {len(folds)} fold(s) done)")

    def finish(self, run: TrialRun, state: TrialState, why: str, value: float | None = None) -> None:
        """End the trial: its jobs cancelled first, then the study told (see the module's docstring)."""
        with self.stops.held():
            jobs = run.active
            # a complete trial's jobs have all written their results and are only exiting
            doomed = [] if state is TrialState.COMPLETE else jobs
            for executor in {id(job.executor): job.executor for job in doomed}.values():
                executor.cancel_all([(job.submission, job.handle) for job in doomed if job.executor is executor])
            self.study.tell(run.trial, value, state=state)
            del self.running[run.number]
            self.extra_wait_s += run.launch.extra_wait_s
            if jobs:
                self.draining.append((run.launch, jobs))
        self._ended(state)
        cancelled = f"; {len(doomed)} job(s) cancelled" if doomed else ""
        say(f"{run.label} {state.name}: {why}{cancelled}  [{_clock(time.monotonic() - run.started)}]")

    def _ended(self, state: TrialState) -> None:
        self.failures_in_a_row = self.failures_in_a_row + 1 if state is TrialState.FAIL else 0

    def drain(self) -> None:
        """Forget cancelled jobs once their executor no longer has them (until then they hold room)."""
        left = []
        for launch, jobs in self.draining:
            statuses = launch.statuses(jobs)
            jobs = [j for j, s in zip(jobs, statuses) if s.state.live]
            if jobs:
                left.append((launch, jobs))
        self.draining = left

    # --- the whole study

    def run(self) -> bool:
        """Until the study holds its trials, all finished (True), or the wait budget is spent or trials
        failed one after another (False: :attr:`gave_up` says which)."""
        self.started = time.monotonic()
        self.resume()
        todo = max(self.settings.trials - self.count(), 0) + len(self.running)
        # sequential folds: a trial holds one job at a time, so fewer trials than --parallel run
        # their folds one after another, not side by side
        at_once = self.settings.parallel if self.settings.fold_order == "parallel" else \
            min(self.settings.parallel, max(todo, 1))
        budget = wait_budget_s(self.cfg, max(todo, 1) * len(self.settings.folds), at_once)
        while True:
            self.poll()
            self.drain()
            self.fill()
            self.show()
            if not self.running and not self.draining and not self.can_ask():
                return not self.gave_up
            if time.monotonic() - self.started > budget + self.wait_extension_s():
                return False
            time.sleep(self.executor.poll_s)

    def wait_extension_s(self) -> float:
        """What the jobs submitted again after they were lost add to the wait budget."""
        return self.extra_wait_s + sum(r.launch.extra_wait_s for r in self.running.values())

    def show(self) -> None:
        states = Counter(t.state.name for t in self.study.get_trials(deepcopy=False))
        finished = states["COMPLETE"] + states["PRUNED"] + states["FAIL"]
        text = (f"{finished}/{self.settings.trials} trials finished ({states['COMPLETE']} complete, "
                f"{states['PRUNED']} pruned, {states['FAIL']} failed), {len(self.running)} running, "
                f"{self.busy()} job(s) running")
        clock = time.monotonic()
        if text != self._shown[0] or clock - self._shown[1] > 60:
            say(f"{text}  [{_clock(clock - self.started)}]")
            self._shown = (text, clock)

    def interrupt(self) -> str:
        """The launcher stops: each executor ends or leaves the unfinished jobs (cv's rule); what happened."""
        jobs = [j for r in self.running.values() for j in r.active] + [j for _, js in self.draining for j in js]
        said = [ex.interrupt([(j.submission, j.handle) for j in jobs if j.executor is ex])
                for ex in {id(j.executor): j.executor for j in jobs}.values()]
        return "; ".join(said) or "no job was running"
