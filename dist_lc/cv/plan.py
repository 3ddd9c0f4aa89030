"""A CV folder's plan and the names of the files its jobs leave; building a plan from a recipe.

The CV folder::

    cv.json                      the plan: resolved config of every grid point, grid, folds, executor
    jobs.json                    every submission (job id, stderr log, result pickle)
    submitit/launch<n>/          submitit's pickles and logs, a fresh folder per launch
    [<point>/]fold<k>/           run dir of a job (train's files + oof.csv, oof_confusion.json, test.csv,
                                 done.json)
    [<point>/]oof.csv            out-of-fold predictions of a grid point
    oof.csv, submission.csv      of the best grid point (the only one without --grid)
    report.md, report.json, plots/

A fold is finished iff its run dir holds ``done.json`` (written last, atomically, by rank 0).
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import itertools
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lc_common.atomic import write_json_atomic
from lc_common.errors import InputError
from lc_common.records import read_json_object, read_record
from shard_tools.manifest import is_url, load_manifest

from ..config import Config, from_dict, load_config, normalized, shard_folder, to_dict

PLAN, JOBS = "cv.json", "jobs.json"
DONE, OOF, TEST, CONFUSION = "done.json", "oof.csv", "test.csv", "oof_confusion.json"
ARRAY_LOCK = ".array.lock"   # held by slurm/cv_array.sbatch's tasks while one of them writes cv.json
PLAN_FORMAT = "dist_lc.cv/1"
FORBIDDEN_GRID = ("data.fold", "data.shards", "launcher.", "cv.")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    # the folds' MLflow experiment and default store when not the CV folder's own (a tune study's trial)
    tracking: dict = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return from_dict(self.points[0].config)

    def point(self, name: str) -> Point:
        return next(p for p in self.points if p.name == name)

    def point_dir(self, point: Point) -> Path:
        return self.cv_dir / point.name if point.name else self.cv_dir

    def run_dir(self, point: Point, fold: int) -> Path:
        return self.point_dir(point) / f"fold{fold}"

    def fold_config(self, point: Point, fold: int) -> dict:
        """The point's config for one fold; its MLflow runs grouped under the CV folder's experiment
        (or the plan's ``tracking``), in a file store in the CV folder unless one is named."""
        config = copy.deepcopy(point.config)
        config["data"]["fold"] = fold
        train = config["train"]
        train["experiment"] = train.get("experiment") or self.tracking.get("experiment") or self.cv_dir.resolve().name
        if not train.get("mlflow_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
            train["mlflow_uri"] = self.tracking.get("store") or (self.cv_dir.resolve() / "mlruns").as_uri()
        return config

    def is_done(self, point: Point, fold: int) -> bool:
        return (self.run_dir(point, fold) / DONE).exists()

    def save(self) -> None:
        write_json_atomic(self.cv_dir / PLAN, {
            "format": PLAN_FORMAT, "created": self.created, "executor": self.executor, "folds": self.folds,
            "grid": self.grid, "points": [vars(p) for p in self.points], "tracking": self.tracking})


def load_plan(cv_dir) -> Plan:
    cv_dir = Path(cv_dir)

    def build(data: dict) -> Plan:
        points = [Point(**p) for p in data["points"]]
        if not points:
            raise ValueError("no grid point")
        for p in points:
            try:
                from_dict(p.config)
            except InputError as exc:
                raise InputError(f"{cv_dir / PLAN}: grid point {p.name or '(the only one)'} was written by another "
                                 f"version of dist_lc ({exc})") from None
        return Plan(cv_dir, points, [int(k) for k in data["folds"]], data.get("grid", {}),
                    data.get("executor", "local"), data.get("created", ""), data.get("tracking", {}))

    return read_record(cv_dir, PLAN, "CV", "CV plan", build)


@dataclass
class Submission:
    """One submitted job, as kept in ``cv_dir/jobs.json`` (enough to watch it from another process)."""
    point: str
    fold: int
    executor: str
    job_id: str
    stderr: str      # rank 0's log
    result: str      # rank 0's result pickle
    submitted: str
    tasks: int = 1   # ranks of the job: each has its own log and result pickle
    slot: int | None = None   # the local executor's slot (its GPUs or cores), kept from a later launch's jobs
    layout: str | None = None   # what the local executor's slots meant then (see LocalExecutor.layout)

    def to_dict(self) -> dict:
        return asdict(self)


def read_submissions(cv_dir: Path) -> list[Submission]:
    path = Path(cv_dir) / JOBS
    if not path.exists():
        return []
    try:
        return [_checked(Submission(**row)) for row in read_json_object(path, "job list")["jobs"]]
    except (KeyError, TypeError) as exc:
        raise InputError(f"{path}: unreadable job list ({type(exc).__name__}: {exc})") from None


def _checked(job: Submission) -> Submission:
    """A row whose fields have their types (a wrong one would fail later, while the jobs are watched)."""
    counts, texts = (job.fold, job.tasks), (job.point, job.executor, job.job_id, job.stderr, job.result)
    if not all(type(v) is int for v in counts) or job.tasks < 1 or not all(isinstance(v, str) for v in texts) \
            or not (job.slot is None or type(job.slot) is int) or not (job.layout is None or isinstance(job.layout, str)):
        raise TypeError(f"job {job.job_id!r} of fold {job.fold!r}: a field of the wrong type")
    return job


def add_submissions(cv_dir: Path, new: list[Submission]) -> None:
    rows = [r.to_dict() for r in read_submissions(cv_dir)]
    write_json_atomic(Path(cv_dir) / JOBS, {"jobs": rows + [r.to_dict() for r in new]})


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
        return [Point("", {}, anchored(to_dict(load_config(config_path, sets))))]
    points = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        overrides = [f"{key}={text}" for key, text in zip(grid, combo)]
        params = {key: yaml.safe_load(text) for key, text in zip(grid, combo)}
        config = anchored(to_dict(load_config(config_path, [*sets, *overrides])))
        points.append(Point(_point_name(index, params), params, config))
    return points


def anchored(config: dict) -> dict:
    """``config`` with a local ``data.shards`` made absolute: the jobs, ``--resume`` and ``dist-lc
    report`` of a plan may run in another folder than the launch."""
    shards = str(config["data"]["shards"])
    if shards.strip() and not is_url(shards):
        config["data"]["shards"] = os.path.abspath(shards)   # symlinks kept: a cluster's /scratch may be one
    return config


def check_folds(cfg: Config) -> list[int]:
    """cv.folds (all the manifest's folds when null), each one the shards have."""
    manifest = load_manifest(shard_folder(cfg))
    k = manifest.num_folds
    return check_fold_list(cfg.cv.folds, k, f"is not in {manifest.root} (its manifest has folds 0..{k - 1})")


def check_fold_list(folds: list | None, k: int, outside: str) -> list[int]:
    """cv.folds of ``k`` folds (all of them when None); ``outside`` ends the line of a fold not among them."""
    folds = list(range(k)) if folds is None else folds
    if not folds:
        raise InputError("config key 'cv.folds' is empty")
    for fold in folds:
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < k:
            raise InputError(f"config key 'cv.folds': fold {fold!r} {outside}")
    if len(set(folds)) != len(folds):
        raise InputError(f"config key 'cv.folds': a fold is listed twice ({folds})")
    return list(folds)


def prepare_array(config_path, sets: list[str], cv_dir: Path) -> Plan:
    """cv.json for slurm/cv_array.sbatch (no grid); an existing one must hold the same config.

    Every array task calls this at its start (and again after a requeue): a lock file of their own
    serialises them (not the launcher's, which a ``dist-lc cv --resume`` holds for as long as it
    watches); a filesystem without locks (Lustre mounted without them) leaves them unserialised.
    """
    points = build_points(config_path, sets, {})
    folds = check_folds(from_dict(points[0].config))
    cv_dir.mkdir(parents=True, exist_ok=True)
    with open(cv_dir / ARRAY_LOCK, "w") as lock:
        with contextlib.suppress(OSError):   # ENOLCK, ENOSYS, EOPNOTSUPP: no locks there
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (cv_dir / PLAN).exists():
            plan = load_plan(cv_dir)
            if plan.grid or normalized(plan.points[0].config) != points[0].config:
                raise InputError(f"{cv_dir / PLAN}: written for another config or a grid; use a fresh CV folder")
            return plan
        others = [p.name for p in cv_dir.iterdir() if p.name != ARRAY_LOCK]
        if others:
            raise InputError(f"{cv_dir}: exists and is not empty nor a CV folder ({others[0]}); use a fresh folder")
        plan = Plan(cv_dir, points, folds, {}, "sbatch", now())
        plan.save()
        return plan
