"""What a tune folder holds besides the study: ``tune.json`` (the settings a --resume continues
with) and one CV folder per trial, laid out by :mod:`dist_lc.cv.plan`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from lc_common.atomic import write_json_atomic
from lc_common.errors import InputError
from lc_common.records import read_record

from ..config import from_dict, normalized
from ..cv.plan import Plan, Point, load_plan, now
from . import FOLD_ORDERS, PRUNERS, SAMPLERS
from .space import Space, space_from_dict, trial_config


SETTINGS, JOURNAL, TRIALS = "tune.json", "study.journal", "trials"
REPORT_MD, REPORT_JSON, BEST = "report.md", "report.json", "best.yaml"
FORMAT = "dist_lc.tune/1"
STUDY_NAME = "dist-lc-tune"


@dataclass
class Settings:
    """Everything that decides what the study runs; written once, at its start."""
    out: Path
    config: dict                 # the resolved base config (recipe + --set, executor, max_parallel)
    space: dict                  # the space as checked (Space.to_dict)
    folds: list[int]
    executor: str
    sampler: str
    seed: int
    pruner: str
    pruner_startup: int          # trials finished before the pruner judges any (median)
    pruner_warmup: int           # the first epochs of every fold, not judged by the pruner
    fold_order: str
    trials: int                  # trials of the whole study (every state counts)
    parallel: int                # jobs running at once, all trials together
    steps_per_fold: int          # a fold's epochs at most: the width of its block of steps
    recipe: str = ""
    space_file: str = ""
    created: str = field(default_factory=now)
    recipe_folds: list[int] | None = None   # cv.folds before --folds narrowed it (best.yaml's); null: every fold

    @property
    def search_space(self) -> Space:
        return space_from_dict(self.space, self.space_file)

    def trial_dir(self, number: int) -> Path:
        return self.out / TRIALS / str(number)

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "out"}
        write_json_atomic(self.out / SETTINGS, {"format": FORMAT, **data})


def is_tune_folder(out: Path) -> bool:
    return (Path(out) / SETTINGS).is_file()


def load_settings(out) -> Settings:
    out = Path(out)

    def build(data: dict) -> Settings:
        if data.pop("format", None) != FORMAT:
            raise ValueError(f"format is not {FORMAT}")
        names = {f.name for f in fields(Settings)} - {"out"}
        settings = Settings(out=out, **{k: v for k, v in data.items() if k in names})
        try:
            from_dict(settings.config)
            settings.search_space
            for key, allowed in (("sampler", SAMPLERS), ("pruner", PRUNERS), ("fold_order", FOLD_ORDERS)):
                if getattr(settings, key) not in allowed:
                    raise InputError(f"{key} {getattr(settings, key)!r} is not one of {', '.join(allowed)}")
        except InputError as exc:
            raise InputError(f"{out / SETTINGS}: written by another version of dist_lc ({exc})") from None
        return settings

    return read_record(out, SETTINGS, "tune", "tune settings", build)


# ----------------------------------------------------------------------------- a trial's CV folder

def trial_plan(settings: Settings, number: int, params: dict) -> Plan:
    """The trial's CV folder, one point holding its config: read when it exists (a resumed trial),
    else created. InputError when the config refuses the parameters together (a constraint between
    two keys that no single value breaks)."""
    cv_dir = settings.trial_dir(number)
    if (cv_dir / "cv.json").exists():
        plan = load_plan(cv_dir)
        if plan.points[0].params != params:   # its folds' results would be told as this trial's
            raise InputError(f"{cv_dir / 'cv.json'}: holds other parameters ({plan.points[0].params}) than trial "
                             f"{number} of the study ({params}): the journal and the trials' folders disagree "
                             "(a journal restored from an older copy?)")
        plan.points[0].config = relaunched(plan.points[0].config, settings, cv_dir / "cv.json")
        return plan
    config = trial_config(settings.config, params)
    # one MLflow store for the study, an experiment per trial named after it (the CV folder's own
    # name, the trial's number, would mix every study's trial k in a shared tracking server)
    study = settings.out.resolve()
    tracking = {"experiment": f"{study.name}/trial{number}", "store": (study / "mlruns").as_uri()}
    plan = Plan(cv_dir, [Point("", dict(params), config)], list(settings.folds), {}, settings.executor, now(),
                tracking)
    cv_dir.mkdir(parents=True, exist_ok=True)
    plan.save()
    return plan


def existing_plan(settings: Settings, number: int) -> Plan | None:
    """The trial's CV folder if it was created (the report reads them; it creates nothing)."""
    cv_dir = settings.trial_dir(number)
    return load_plan(cv_dir) if (cv_dir / "cv.json").exists() else None


def relaunched(config: dict, settings: Settings, source: Path) -> dict:
    """A trial's config with the study's launcher as it is now (a resume may change launcher keys):
    its next folds run on the study's executor, with as many ranks as that gives. InputError naming
    ``source`` when its batch does not fit them."""
    from ..cv.launch import check_launcher   # as trial_config: only a launcher checks a trial

    config = normalized({**config, "launcher": settings.config["launcher"]})
    try:
        check_launcher(from_dict(config), settings.executor)
    except InputError as exc:
        raise InputError(f"{source}: the trial's folds cannot run with the launcher as now given ({exc}); "
                         "resume with the launcher keys it started with until it ends") from None
    return config
