"""``dist-lc tune``: a hyper-parameter search whose trials are cross-validation runs as jobs.

    dist-lc tune --config RECIPE --space SPACE.yaml --out DIR [--trials N] [--parallel P]
                 [--executor local|slurm] [--folds 0,1,2] [--sampler tpe|random|qmc|cmaes]
                 [--pruner median|halving|hyperband|none] [--fold-order sequential|parallel]
                 [--seed S] [--pruner-startup N] [--pruner-warmup N] [--set k=v ...]
    dist-lc tune --out DIR --resume [--trials N] [--parallel P] [--executor ...] [--set launcher.k=v]
    dist-lc tune --report DIR

Everything is checked before DIR is created: the recipe, the folds against the shards, the
launcher section, the space against the config's declarations, the sampler against the space, the
output folder and, for Slurm, that the controller answers. One launcher at a time holds DIR.

Stopped by Ctrl-C, SIGTERM or SIGHUP, it does what `dist-lc cv` does: the unfinished jobs go to their
executor (local ones are ended within seconds, Slurm ones go on), one line, exit 128 + the signal's
number; ``--resume`` continues the same study: finished trials stay as they are, running ones go on.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from lc_common.errors import InputError
from lc_common.locks import held

from ..config import apply_overrides, describe, from_dict, load_config, normalized, to_dict
from ..cv import executors
from ..cv.launch import StopRequests, Stopped, check_executor, check_launcher, hand_over
from ..cv.plan import anchored, check_folds, load_plan
from ..run_dir import check_output_folder
from .settings import Settings, is_tune_folder, load_settings, relaunched
from .space import Space, load_space

DEFAULTS = {"sampler": "tpe", "pruner": "median", "fold_order": "sequential", "seed": 0,
            "pruner_startup": 4, "pruner_warmup": None, "trials": 20}   # warm-up: default_warmup
FIXED_ON_RESUME = ("config", "space", "folds", "sampler", "pruner", "fold_order", "seed", "pruner_startup",
                   "pruner_warmup")
LOCK = ".tune.lock"


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- a new study

def parse_folds(text: str | None) -> list[str]:
    """``--folds 0,2`` as a ``cv.folds`` override (the config and the shards check the folds)."""
    if text is None:
        return []
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise InputError(f"--folds {text!r}: expected fold numbers separated by commas, e.g. 0,1,2")
    return [f"cv.folds=[{','.join(parts)}]"]


def steps_per_fold(space: Space, epochs: int) -> int:
    """A fold's epochs at most: train.epochs, or its largest value when the search varies it."""
    if "train.epochs" not in space.keys:
        return epochs
    p = space.param("train.epochs")
    return int(max(p.choices) if p.kind == "categorical" else p.high)


def default_warmup(steps_per_fold: int) -> int:
    """A quarter of a fold's epochs: early validations rank trials by how fast they start (a high
    learning rate starts worst and often ends best), not by where they end."""
    return steps_per_fold // 4


def default_parallel(kind: str, launcher, folds: int) -> int:
    """launcher.max_parallel, else what the executor runs at once, else (a queue) a trial's folds."""
    if launcher.max_parallel:
        return launcher.max_parallel
    capacity = executors.executor_class(kind)(launcher, Path(os.devnull), 1).capacity()
    return int(capacity) if capacity != math.inf else folds


def check_new_out(out: Path) -> None:
    if is_tune_folder(out):
        raise InputError(f"{out}: already a tune folder; add --resume to continue its study, or choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: exists and is not an empty folder nor a tune folder; choose another --out")
    check_output_folder(out, "--out")


def new_settings(args) -> Settings:
    if not args.space:
        raise InputError("--space SPACE.yaml is required: the keys to search and their distributions")
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULTS.items()}
    cfg = load_config(args.config, [*args.set, *parse_folds(args.folds)])
    recipe_folds = load_config(args.config, args.set).cv.folds if args.folds else cfg.cv.folds
    kind = args.executor or cfg.launcher.executor
    base = normalized(apply_overrides(to_dict(cfg), [f"launcher.executor={kind}"]))
    check_launcher(from_dict(base), kind)   # before the space, whose values it would be blamed on
    space = load_space(args.space, base)
    from .study import check_sampler

    check_sampler(values["sampler"], space)
    if values["trials"] > space.points():   # the samplers draw a point again rather than end
        print(f"tune: warning: the space holds {space.points()} points and --trials is {values['trials']}: "
              "some will be drawn (and run) more than once; dist-lc cv --grid runs each point once",
              file=sys.stderr, flush=True)
    folds = check_folds(cfg)
    parallel = args.parallel or default_parallel(kind, cfg.launcher, len(folds))
    config = anchored(normalized(apply_overrides(to_dict(cfg), [f"launcher.executor={kind}",
                                                                f"launcher.max_parallel={parallel}"])))
    check_launcher(from_dict(config), kind)
    out = Path(args.out)
    check_new_out(out)
    steps = steps_per_fold(space, cfg.train.epochs)
    warmup = default_warmup(steps) if values["pruner_warmup"] is None else values["pruner_warmup"]
    if cfg.train.time_limit is not None and values["pruner_warmup"] is None and values["pruner"] != "none":
        print(f"tune: warning: train.time_limit may end a fold before train.epochs ({steps}), and so before the "
              f"default warm-up of {warmup} epochs (a quarter of them): such folds are judged at their end only; "
              "--pruner-warmup N sets it in epochs (e.g. a quarter of those a fold runs in its time)",
              file=sys.stderr, flush=True)
    return Settings(out=out, config=config, space=space.to_dict(), folds=folds, executor=kind,
                    sampler=values["sampler"], seed=values["seed"], pruner=values["pruner"],
                    pruner_startup=values["pruner_startup"], pruner_warmup=warmup,
                    fold_order=values["fold_order"], trials=values["trials"], parallel=parallel,
                    steps_per_fold=steps, recipe=str(args.config or ""),
                    space_file=str(args.space), recipe_folds=recipe_folds)


# ----------------------------------------------------------------------------- a resumed study

def resumed_settings(args) -> Settings:
    """The saved settings; only --trials, --parallel, --executor and launcher keys may change."""
    given = [option(k) for k in FIXED_ON_RESUME if getattr(args, k, None) is not None]
    if given:
        raise InputError(f"--resume continues the study as it was set up: drop {given[0]}")
    other = [s for s in args.set if not s.strip().startswith("launcher.")]
    if other:
        raise InputError(f"--resume: only launcher.* keys can be changed, not {other[0]!r}")
    settings = load_settings(args.out)
    # the executor and the jobs at once follow the config, whichever way they were changed
    # (--executor/--parallel win over the same keys given with --set)
    sets = [*args.set, *([f"launcher.executor={args.executor}"] if args.executor else []),
            *([f"launcher.max_parallel={args.parallel}"] if args.parallel else [])]
    cfg = from_dict(normalized(apply_overrides(settings.config, sets)))
    settings.executor = cfg.launcher.executor
    settings.parallel = default_parallel(settings.executor, cfg.launcher, len(settings.folds))
    settings.config = normalized(apply_overrides(to_dict(cfg), [f"launcher.max_parallel={settings.parallel}"]))
    if args.trials is not None:
        settings.trials = args.trials
    check_launcher(from_dict(settings.config), settings.executor)
    return settings


# ----------------------------------------------------------------------------- running it

def holding(out: Path):
    """One launcher per tune folder: a second one would submit the same trials' folds again."""
    return held(out / LOCK, f"{out}: another dist-lc tune ({{holder}}) is running this study")


def run(args) -> int:
    if args.report:
        return report_only(args)
    if args.print_config and not args.resume:
        print(describe(load_config(args.config, args.set)))
        return 0
    if not args.out:
        raise InputError("--out DIR is required (or --report DIR)")
    if args.print_config:
        print(describe(from_dict(load_settings(args.out).config)))
        return 0
    settings = resumed_settings(args) if args.resume else new_settings(args)
    check_executor(settings.executor)
    settings.out.mkdir(parents=True, exist_ok=True)
    with holding(settings.out):
        settings.save()
        return study_run(settings, args.resume)


def study_run(settings: Settings, resumed: bool) -> int:
    from .scheduler import FAILURES_IN_A_ROW, Scheduler, say
    from .study import open_study

    study = open_study(settings)
    if resumed:
        check_running_trials(settings, study)
    stops = StopRequests()
    scheduler = Scheduler(settings, study, stops)
    say(f"{'continuing' if resumed else 'a new'} study in {settings.out}: {settings.trials} trial(s), "
        f"{len(settings.folds)} fold(s) each ({settings.fold_order}), {settings.parallel} job(s) at once "
        f"({settings.executor}); sampler {settings.sampler}, pruner {settings.pruner}")
    with stops:   # still open while the jobs are ended: a second signal cannot cut that short
        try:
            finished = scheduler.run()
            if not finished and (scheduler.running or scheduler.draining):   # as a stop: jobs left unwatched
                say(f"wait deadline passed with trials unfinished; {hand_over(stops, scheduler.interrupt)}: "
                    f"dist-lc tune --out {settings.out} --resume continues the study")
        except Stopped as stop:
            say(f"stopped by {stop.signal_name}; {scheduler.interrupt()}: dist-lc tune --out {settings.out} "
                "--resume continues the study")
            return stop.exit_status
        except BaseException:   # the jobs would otherwise run on unwatched; the error follows
            say(f"the launcher failed; {hand_over(stops, scheduler.interrupt)}")
            raise
    if scheduler.gave_up:
        say(f"{FAILURES_IN_A_ROW} trials failed in a row, so no new trial was started: their logs say why; "
            f"once that is fixed, dist-lc tune --out {settings.out} --resume goes on")
    return finish(settings, finished)


def check_running_trials(settings: Settings, study) -> None:
    """Before anything is submitted or adopted: the trials an earlier launcher left running can go on
    with the launcher keys given now (as many ranks per job as their batch allows)."""
    from optuna.trial import TrialState

    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        cv_json = settings.trial_dir(frozen.number) / "cv.json"
        try:
            config = load_plan(cv_json.parent).points[0].config if cv_json.exists() else None
        except InputError:   # a damaged folder fails its own trial when it is opened, not the whole resume
            continue
        if config is not None:
            relaunched(config, settings, cv_json)


def finish(settings: Settings, finished: bool) -> int:
    """The report; 0 when the study holds its trials and one of them completed."""
    from . import report

    built = report.build(settings.out)
    print(report.summary(built))
    return 0 if finished and built["best"] is not None else 1


def report_only(args) -> int:
    from . import report

    # every other option would be silently ignored: --report reads the folder alone
    extra = [k for k, v in vars(args).items() if k not in ("command", "report") and v not in (None, False, [])]
    if extra:
        raise InputError(f"--report DIR rebuilds the report from DIR alone: drop {option(extra[0])}")
    built = report.build(Path(args.report))
    print(report.summary(built))
    return 0
