"""The Optuna study of a tune folder: its storage, sampler and pruner.

Storage: Optuna's ``JournalStorage`` over a ``JournalFileBackend`` in ``DIR/study.journal``, an
append-only log of the study's operations: no database server, and its default lock (a symbolic
link) works on a shared filesystem, so a launcher on a login node and a report on another machine
read the same study. Every trial state a launcher recorded survives its death; a trial it had
started is still RUNNING there, and the next launcher continues it (:mod:`.scheduler`). A line its
death cut short is refused, with how to remove it, before a launcher appends (:func:`check_journal`);
the report reads past it, as Optuna does.

The sampler is re-created by every launch and samples from all the study's trials. Its random
stream is not in the study, so each launch seeds it with the configured seed plus the trials the
study already holds: a resumed study draws new parameters, and the same seed on a new folder draws
the same ones. QMC's position in its sequence is in the study, under a key that holds its seed, so
that seed stays; only the sampler it draws at random with (its first trial, and the categorical keys
in Optuna versions that keep them out of the sequence) follows the launch's seed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lc_common.errors import InputError, one_line

from . import PRUNERS, SAMPLERS
from .settings import JOURNAL, SETTINGS, STUDY_NAME, TRIALS, Settings
from .space import Space

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def quiet() -> None:
    """Optuna's own per-trial lines and its warnings about seeds or independent sampling are noise
    here: the launcher prints one line per trial event itself."""
    optuna.logging.set_verbosity(logging.WARNING)
    warnings.filterwarnings("ignore", module="optuna")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage(out: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(Path(out) / JOURNAL)))


def check_journal(out: Path, new: bool = False, appending: bool = True) -> None:
    """Refuse a journal that Optuna would misread: a missing or empty one (Optuna would start an empty
    study, or fail on a record it cannot find) unless the study is new, and, for a launcher that will
    append to it, one whose last line was cut short by a launcher killed while writing it (Optuna
    skips that line and appends the next launch's operations onto it, which leaves a journal no one
    can read). A reader skips such a line as Optuna does: it may be a running launcher's append, half
    seen over a network filesystem."""
    path = Path(out) / JOURNAL
    if not path.exists() or path.stat().st_size == 0:
        if new:
            return
        raise InputError(f"{path}: {'empty' if path.exists() else 'missing'} beside {SETTINGS}; it is the study's "
                         "only record of its trials: restore it, or start a new study with another --out")
    if not appending:
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: unreadable study journal ({one_line(exc)})") from None
    cut = len(data) - (data.rfind(b"\n") + 1)
    if cut:
        raise InputError(f"{path}: its last line is cut short ({cut} bytes; a launcher killed while writing it): "
                         f"remove that partial line (truncate -s -{cut} {path}) and run again")


@contextlib.contextmanager
def journal_errors(out: Path):
    """Optuna's errors on a damaged journal, as one line naming it."""
    try:
        yield
    except (ValueError, KeyError) as exc:   # JSONDecodeError, "Invalid log format", "Record does not exist"
        raise InputError(f"{Path(out) / JOURNAL}: unreadable study journal "
                         f"({type(exc).__name__}: {one_line(exc)})") from None


# ----------------------------------------------------------------------------- samplers

def _seed(seed: int, drawn: int) -> int:
    """The launch's seed: numpy's generators take 0 to 2**32 - 1, and a resumed study adds its trials."""
    return (seed + drawn) % 2**32


def _tpe(seed: int, drawn: int, space: Space):
    return optuna.samplers.TPESampler(seed=_seed(seed, drawn), constant_liar=True)  # parallel trials: running ones count


def _random(seed: int, drawn: int, space: Space):
    return optuna.samplers.RandomSampler(seed=_seed(seed, drawn))


def _qmc(seed: int, drawn: int, space: Space):
    return optuna.samplers.QMCSampler(seed=seed, scramble=True,
                                      independent_sampler=optuna.samplers.RandomSampler(seed=_seed(seed, drawn)))


def _cmaes(seed: int, drawn: int, space: Space):
    return optuna.samplers.CmaEsSampler(seed=_seed(seed, drawn))


SAMPLER_TABLE = {"tpe": _tpe, "random": _random, "qmc": _qmc, "cmaes": _cmaes}


def check_sampler(name: str, space: Space) -> None:
    """Refuse, in one line, a sampler that cannot search this space."""
    if name == "cmaes":
        categorical = [p.key for p in space.params if not p.numeric]
        if categorical:
            raise InputError(f"--sampler cmaes searches numeric spaces only; {categorical[0]} is categorical "
                             "(use tpe, random or qmc)")
        if importlib.util.find_spec("cmaes") is None:
            raise InputError("--sampler cmaes needs the cmaes package (pip install cmaes)")


def make_sampler(name: str, seed: int, space: Space, drawn: int = 0):
    """The sampler of a launch whose study already holds ``drawn`` trials."""
    return SAMPLER_TABLE[name](seed, drawn, space)


# ----------------------------------------------------------------------------- pruners

def total_steps(settings: Settings) -> int:
    """Steps a trial that runs to its end reports: a block per fold one after another, or one block."""
    folds = len(settings.folds) if settings.fold_order == "sequential" else 1
    return folds * settings.steps_per_fold


class MedianNowPruner(optuna.pruners.MedianPruner):
    """Optuna's median rule on the trial's value at its last step, not on the best value it ever
    reported. A trial's value here is already a best-so-far within a fold, but it rises when the
    next fold starts (the finished folds' mean, then the running fold's best): judged on its best
    value ever, a trial whose first fold went well would survive any later fold."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        now = copy.copy(trial)
        now.intermediate_values = {step: trial.intermediate_values[step]}
        return super().prune(study, now)


def _median(settings: Settings):
    return MedianNowPruner(n_startup_trials=settings.pruner_startup, n_warmup_steps=settings.pruner_warmup)


def _halving(settings: Settings):
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, settings.pruner_warmup))


def _hyperband(settings: Settings):
    return optuna.pruners.HyperbandPruner(min_resource=max(1, settings.pruner_warmup),
                                          max_resource=max(total_steps(settings), 1))


def _none(settings: Settings):
    return optuna.pruners.NopPruner()


PRUNER_TABLE = {"median": _median, "halving": _halving, "hyperband": _hyperband, "none": _none}

# the names the command line offers are those implemented here, and only those
for _names, _table in ((SAMPLERS, SAMPLER_TABLE), (PRUNERS, PRUNER_TABLE)):
    if set(_names) != set(_table):
        raise ImportError(f"dist_lc.tune.study: implements {sorted(_table)}, the command line offers {sorted(_names)}")


# ----------------------------------------------------------------------------- the study

def open_study(settings: Settings) -> optuna.Study:
    """The study of the tune folder, created at the first launch, loaded by the later ones."""
    quiet()
    check_journal(settings.out, new=not (settings.out / TRIALS).exists())
    with journal_errors(settings.out):
        study = optuna.create_study(storage=storage(settings.out), study_name=STUDY_NAME, direction="minimize",
                                    load_if_exists=True)
        drawn = len(study.get_trials(deepcopy=False))
    # set once the study is open: the sampler's seed depends on the trials it already holds
    study.sampler = make_sampler(settings.sampler, settings.seed, settings.search_space, drawn)
    study.pruner = PRUNER_TABLE[settings.pruner](settings)
    return study


def load_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read without a sampler or a pruner (the report)."""
    return load_study(out).get_trials(deepcopy=False)


def load_study(out: Path) -> optuna.Study:
    quiet()
    check_journal(out, appending=False)
    with journal_errors(out):
        return optuna.load_study(study_name=STUDY_NAME, storage=storage(out))


def reopen(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A handle on a trial that an earlier launcher started, to report to and prune it. Optuna
    offers no public way from a trial's number to its handle; the storage's id is what ask() wraps."""
    return optuna.Trial(study, frozen._trial_id)


def all_params(trial: optuna.Trial, distributions: dict) -> dict:
    """The trial's parameters, one for every key of the space. Optuna journals a new trial and each
    of its parameters as separate lines, so a launcher killed inside ``ask()`` leaves a RUNNING trial
    with only some of them: the missing ones are drawn now, before its CV folder fixes its config
    (the base config's value would otherwise stand in, unrecorded)."""
    for name, dist in distributions.items():
        if name in trial.params:
            continue
        if isinstance(dist, optuna.distributions.FloatDistribution):
            trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            trial.suggest_categorical(name, dist.choices)
    return trial.params
