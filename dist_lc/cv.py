"""``dist-lc cv``: cross-validation (and grids) as one multi-task DDP job per (grid point × fold).

    dist-lc cv --config configs/cv5.yaml --out CVDIR [--executor slurm|local] [--set k=v ...]
               [--grid optim.lr=0.001,0.0003 ...] [--no-wait]
    dist-lc cv --out CVDIR --resume        # resubmit only the folds without done.json
    dist-lc report CVDIR                   # (re)build the report, e.g. after --no-wait

The CV folder::

    cv.json                      the plan: resolved config of every grid point, grid, folds, executor
    jobs.json                    every submission (job id, stderr log, result pickle)
    submitit/launch<n>/          submitit's pickles and logs, a fresh folder per launch
    [<point>/]fold<k>/           run dir of a job (train's files + oof.csv, test.csv, done.json)
    [<point>/]oof.csv            out-of-fold predictions of a grid point
    oof.csv, submission.csv      of the best grid point (the only one without --grid)
    report.md, report.json, plots/

Everything is validated before anything is written or submitted: the config of every grid point
(load_config), the folds against the shards' manifest, the launcher section, the output folder
and, for Slurm, that the controller answers. Jobs themselves: :mod:`dist_lc.jobs`.
"""
from __future__ import annotations

import copy
import fcntl
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from shard_tools.errors import InputError
from shard_tools.manifest import load_manifest, write_json_atomic

from . import jobs
from .config import Config, apply_overrides, from_dict, load_config, normalized, to_dict

PLAN, JOBS = "cv.json", "jobs.json"
PLAN_FORMAT = "dist_lc.cv/1"
POLL_S = 2.0           # between two looks at the jobs
GRACE_S = {"slurm": 15.0, "local": 2.0}  # a job gone without done.json is failed after this long
FORBIDDEN_GRID = ("data.fold", "data.shards", "launcher.", "cv.")


@dataclass
class Point:
    """One grid point (the only one, named "", without --grid)."""
    name: str
    params: dict
    config: dict   # resolved; data.fold is set per job


@dataclass
class Plan:
    cv_dir: Path
    points: list[Point]
    folds: list[int]
    grid: dict = field(default_factory=dict)
    executor: str = "local"
    created: str = ""

    @property
    def config(self) -> Config:
        return from_dict(self.points[0].config)

    def point_dir(self, point: Point) -> Path:
        return self.cv_dir / point.name if point.name else self.cv_dir

    def run_dir(self, point: Point, fold: int) -> Path:
        return self.point_dir(point) / f"fold{fold}"

    def fold_config(self, point: Point, fold: int) -> dict:
        config = copy.deepcopy(point.config)
        config["data"]["fold"] = fold
        return config

    def is_done(self, point: Point, fold: int) -> bool:
        return (self.run_dir(point, fold) / jobs.DONE).exists()

    def save(self) -> None:
        write_json_atomic(self.cv_dir / PLAN, {
            "format": PLAN_FORMAT, "created": self.created, "executor": self.executor, "folds": self.folds,
            "grid": self.grid, "points": [vars(p) for p in self.points]})


def load_plan(cv_dir) -> Plan:
    cv_dir = Path(cv_dir)
    path = cv_dir / PLAN
    if not path.is_file():
        raise InputError(f"{cv_dir}: not a CV folder (no {PLAN})")
    try:
        data = json.loads(path.read_text())
        points = [Point(**p) for p in data["points"]]
        for p in points:
            from_dict(p.config)
        return Plan(cv_dir, points, [int(k) for k in data["folds"]], data.get("grid", {}),
                    data.get("executor", "local"), data.get("created", ""))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable CV plan ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- building a plan

def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["optim.lr=0.001,0.0003", ...]`` → ``{"optim.lr": ["0.001", "0.0003"]}`` (values as typed)."""
    grid: dict[str, list[str]] = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise InputError(f"--grid {item!r}: expected key=v1,v2,...")
        if key in grid:
            raise InputError(f"--grid {key}: given twice")
        if key.startswith(FORBIDDEN_GRID) or key in FORBIDDEN_GRID:
            raise InputError(f"--grid {key}: cannot vary within a CV (the launcher, cv, data.fold and "
                             "data.shards are shared by every job)")
        grid[key] = [v.strip() for v in values.split(",")]
    return grid


def _point_name(index: int, params: dict) -> str:
    parts = [f"{key.split('.')[-1]}={value}" for key, value in params.items()]
    return "-".join([f"g{index:02d}", *parts]).replace("/", "_").replace(" ", "")


def build_points(config_path, sets: list[str], grid: dict[str, list[str]]) -> list[Point]:
    """Every grid point's config through load_config (the cartesian product of the axes)."""
    for key, values in grid.items():  # each axis on its own first: an error names its key
        for text in values:
            try:
                load_config(config_path, [*sets, f"{key}={text}"])
            except InputError as exc:
                raise InputError(f"--grid {key}={','.join(values)}: {exc}") from None
    if not grid:
        return [Point("", {}, to_dict(load_config(config_path, sets)))]
    points = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        overrides = [f"{key}={text}" for key, text in zip(grid, combo)]
        params = {key: yaml.safe_load(text) for key, text in zip(grid, combo)}
        points.append(Point(_point_name(index, params), params, to_dict(load_config(config_path, [*sets, *overrides]))))
    return points


def check_folds(cfg: Config) -> list[int]:
    """cv.folds (all the manifest's folds when null), each one the shards have."""
    if not cfg.data.shards:
        raise InputError("config key 'data.shards' is empty: --set data.shards=DIR")
    manifest = load_manifest(cfg.data.shards)
    k = manifest.num_folds
    folds = list(range(k)) if cfg.cv.folds is None else cfg.cv.folds
    if not folds:
        raise InputError("config key 'cv.folds' is empty")
    for fold in folds:
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < k:
            raise InputError(f"config key 'cv.folds': fold {fold!r} is not in {manifest.root} "
                             f"(its manifest has folds 0..{k - 1})")
    if len(set(folds)) != len(folds):
        raise InputError(f"config key 'cv.folds': a fold is listed twice ({folds})")
    return list(folds)


def check_launcher(cfg: Config, kind: str) -> None:
    lc, t = cfg.launcher, cfg.train
    if min(lc.nodes, lc.tasks_per_node, lc.cpus_per_task, lc.time_min) < 1 or lc.gpus_per_node < 0:
        raise InputError("config: launcher.nodes, tasks_per_node, cpus_per_task and time_min must be >= 1")
    if kind == "local" and lc.nodes != 1:
        raise InputError(f"config: launcher.nodes={lc.nodes} needs --executor slurm (the local executor has one node)")
    if lc.time_min * 60 <= lc.signal_delay_s + 60:
        raise InputError(f"config: launcher.time_min={lc.time_min} leaves no time before the stop signal "
                         f"(launcher.signal_delay_s={lc.signal_delay_s}): time_min * 60 must exceed "
                         "signal_delay_s + 60")
    world = lc.nodes * lc.tasks_per_node
    accum = t.batch_size // t.micro_batch_size
    if accum % world:
        raise InputError(f"config: train.batch_size {t.batch_size} is not micro_batch_size {t.micro_batch_size} × "
                         f"accumulation × {world} ranks (launcher.nodes × launcher.tasks_per_node)")


def check_executor(kind: str) -> None:
    if kind == "slurm":
        problem = jobs.slurm_problem()
        if problem:
            raise InputError(f"--executor slurm: {problem}; nothing submitted")


def check_new_out(cv_dir: Path) -> None:
    if (cv_dir / PLAN).exists():
        raise InputError(f"{cv_dir}: already a CV folder; add --resume to finish it, or choose another --out")
    if cv_dir.exists() and (not cv_dir.is_dir() or any(cv_dir.iterdir())):
        raise InputError(f"{cv_dir}: exists and is not an empty folder nor a CV folder; choose another --out")


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
    return Plan(cv_dir, points, folds, grid, kind, datetime.now(timezone.utc).isoformat(timespec="seconds"))


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

class Launch:
    """Submits the jobs of a plan and watches them until each one is done or failed."""

    def __init__(self, plan: Plan, already_done: int = 0):
        self.plan, self.already_done = plan, already_done
        self.cfg = from_dict(plan.points[0].config)
        self.kind = plan.executor
        self.points = {p.name: p for p in plan.points}
        self.records: dict[tuple[str, int], jobs.JobRecord] = {}   # the jobs being watched
        self.handles: dict[tuple[str, int], object] = {}            # their submitit Job objects
        self.slots: dict[tuple[str, int], int] = {}                 # local executor: device slot
        self.queue: list[tuple[str, int]] = []                      # not submitted yet
        self.final: dict[tuple[str, int], tuple[str, str]] = {}     # (done | failed, detail)
        self.states: dict[tuple[str, int], str] = {}                # last status seen
        self._ex = None
        self._shown = ("", 0.0)
        self.started = time.monotonic()
        self.to_run = 0

    def run_dir(self, key: tuple[str, int]) -> Path:
        return self.plan.run_dir(self.points[key[0]], key[1])

    # --- submission

    def capacity(self) -> float:
        lc = self.cfg.launcher
        if self.kind == "slurm":
            return math.inf  # Slurm queues; the array's parallelism carries launcher.max_parallel
        return lc.max_parallel or jobs.local_capacity(lc)

    def executor(self):
        if self._ex is None:  # a fresh submitit folder per launch: Slurm job ids may restart at 1
            root = self.plan.cv_dir / "submitit"
            folder = root / f"launch{len(list(root.glob('launch*'))) if root.exists() else 0}"
            self._ex = jobs.make_executor(self.cfg.launcher, self.kind, folder, max(self.to_run, 1))
        return self._ex

    def start(self, todo: list[tuple[str, int]], resume: bool) -> None:
        """Keep watching the jobs of an earlier launch that still run (--resume); queue the others."""
        self.to_run = len(todo)
        earlier = {(r.point, r.fold): r for r in _read_records(self.plan.cv_dir)} if resume else {}
        slurm_ids = [r.job_id for k, r in earlier.items() if k in todo and r.executor == "slurm"]
        slurm = jobs.slurm_states(slurm_ids) if slurm_ids else {}
        for key in todo:
            record = earlier.get(key)
            status = jobs.job_status(record, self.run_dir(key), slurm)[0] if record else None
            if status in ("running", "pending", "unknown"):
                self.records[key] = record
                print(f"cv: {_label(key)} still running as job {record.job_id}: watching it", file=sys.stderr)
            else:
                self.queue.append(key)
        self.submit_queued()

    def running(self) -> int:
        return sum(1 for key in self.records if key not in self.final)

    def submit_queued(self) -> None:
        room = self.capacity() - self.running()
        take = list(self.queue) if room == math.inf else self.queue[:max(int(room), 0)]
        if not take:
            return
        self.queue = self.queue[len(take):]
        work = []
        for key in take:
            point = self.points[key[0]]
            self.run_dir(key).mkdir(parents=True, exist_ok=True)
            work.append((*key, self.plan.fold_config(point, key[1]), str(self.run_dir(key)), self.cfg.cv.tta))
        if self.kind == "slurm":
            self._record(*jobs.submit(self.executor(), self.kind, work))
            return
        for item in work:  # local: one at a time, each on its own device slot
            used = {self.slots[k] for k in self.records if k not in self.final and k in self.slots}
            slot = min(set(range(int(self.capacity()))) - used, default=0)
            self.slots[item[:2]] = slot
            self._record(*jobs.submit(self.executor(), self.kind, [item], gpu_slot=slot))

    def _record(self, records, handles) -> None:
        for record, handle in zip(records, handles):
            key = (record.point, record.fold)
            self.records[key], self.handles[key] = record, handle
            self.final.pop(key, None)
        path = self.plan.cv_dir / JOBS
        rows = [r.to_dict() for r in _read_records(self.plan.cv_dir)]
        write_json_atomic(path, {"jobs": rows + [r.to_dict() for r in records]})

    # --- watching

    def poll(self, ended_at: dict) -> None:
        watched = [k for k in self.records if k not in self.final]
        slurm = jobs.slurm_states([self.records[k].job_id for k in watched if self.records[k].executor == "slurm"])
        now = time.monotonic()
        for key in watched:
            record = self.records[key]
            status, detail = jobs.job_status(record, self.run_dir(key), slurm, self.handles.get(key))
            if status == "ended":
                ended_at.setdefault(key, now)
                if now - ended_at[key] < GRACE_S[record.executor]:
                    continue
                status, detail = "failed", f"{detail} without {jobs.DONE}"
            else:
                ended_at.pop(key, None)
            self.states[key] = status
            if status in ("done", "failed"):
                self.final[key] = (status, detail)
            if status == "failed":
                print(f"cv: {_label(key)} FAILED (job {record.job_id}: {detail}); log: {record.stderr}",
                      file=sys.stderr, flush=True)

    def counts(self, total: int) -> str:
        done = sum(1 for s, _ in self.final.values() if s == "done") + self.already_done
        failed = sum(1 for s, _ in self.final.values() if s == "failed")
        active = [self.states.get(k, "pending") for k in self.records if k not in self.final]
        running = sum(1 for s in active if s in ("running", "ended"))
        queued = len(active) - running + len(self.queue)
        return f"{done}/{total} done, {running} running, {queued} queued, {failed} failed"

    def show(self, total: int, force: bool = False) -> None:
        text, now = self.counts(total), time.monotonic()
        if force or text != self._shown[0] or now - self._shown[1] > 60:
            print(f"cv: {text}  [{_clock(now - self.started)}]", file=sys.stderr, flush=True)
            self._shown = (text, now)

    def wait(self, total: int, deadline_s: float) -> bool:
        """Poll until every job is done or failed (True) or the deadline passes (False)."""
        self.started, ended_at = time.monotonic(), {}
        while True:
            self.poll(ended_at)
            self.submit_queued()
            self.show(total)
            if not self.queue and all(k in self.final for k in self.records):
                return True
            if time.monotonic() - self.started > deadline_s:
                return False
            time.sleep(POLL_S)

    @property
    def all_done(self) -> bool:
        return not self.queue and all(self.final.get(k, ("",))[0] == "done" for k in self.records)


def _read_records(cv_dir: Path) -> list[jobs.JobRecord]:
    path = cv_dir / JOBS
    return [jobs.JobRecord(**row) for row in json.loads(path.read_text())["jobs"]] if path.exists() else []


def _label(key: tuple[str, int]) -> str:
    point, fold = key
    return f"{point}/fold{fold}" if point else f"fold{fold}"


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
    plan = resumed_plan(args) if args.resume else new_plan(args)
    check_executor(plan.executor)
    keys = [(p.name, k) for p in plan.points for k in plan.folds]
    todo = [(p.name, k) for p in plan.points for k in plan.folds if not plan.is_done(p, k)]
    launch = Launch(plan, already_done=len(keys) - len(todo))
    if args.no_wait and plan.executor == "local" and len(todo) > launch.capacity():
        raise InputError(f"--no-wait with the local executor: {len(todo)} jobs but {launch.capacity()} at once "
                         "(launcher.max_parallel; the local executor has no queue): wait, or raise max_parallel")
    plan.cv_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        plan.save()
    print(f"cv: {len(plan.points)} grid point(s) × {len(plan.folds)} fold(s) in {plan.cv_dir} "
          f"({plan.executor}); {len(todo)} job(s) to run", file=sys.stderr, flush=True)
    launch.start(todo, resume=args.resume)
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
    failed = [(key, detail) for key, (status, detail) in launch.final.items() if status == "failed"]
    for key, detail in failed:
        print(f"cv: {_label(key)} failed ({detail}); log: {launch.records[key].stderr}", file=sys.stderr)
    if failed:
        print(f"cv: {len(failed)} job(s) failed; after a fix: dist-lc cv --out {plan.cv_dir} --resume",
              file=sys.stderr)
    return 0 if finished and launch.all_done else 1


# ----------------------------------------------------------------------------- the job-array path

def prepare_array(config_path, sets: list[str], cv_dir: Path) -> Plan:
    """cv.json for slurm/cv_array.sbatch (no grid); an existing one must hold the same config.

    Every array task calls this at its start (and again after a requeue): a lock file serialises them.
    """
    points = build_points(config_path, sets, {})
    folds = check_folds(from_dict(points[0].config))
    cv_dir.mkdir(parents=True, exist_ok=True)
    with open(cv_dir / ".cv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (cv_dir / PLAN).exists():
            plan = load_plan(cv_dir)
            if plan.grid or normalized(plan.points[0].config) != points[0].config:
                raise InputError(f"{cv_dir / PLAN}: written for another config or a grid; use a fresh CV folder")
            return plan
        others = [p.name for p in cv_dir.iterdir() if p.name != ".cv.lock"]
        if others:
            raise InputError(f"{cv_dir}: exists and is not empty nor a CV folder ({others[0]}); use a fresh folder")
        plan = Plan(cv_dir, points, folds, {}, "sbatch", datetime.now(timezone.utc).isoformat(timespec="seconds"))
        plan.save()
        return plan


def array_fold(cv_dir: Path, fold: int) -> tuple[Config, Path, bool]:
    plan = load_plan(cv_dir)
    if fold not in plan.folds:
        raise InputError(f"{cv_dir / PLAN}: fold {fold} is not in cv.folds {plan.folds}")
    point = plan.points[0]
    cfg = from_dict(plan.fold_config(point, fold))
    return cfg, plan.run_dir(point, fold), cfg.cv.tta
