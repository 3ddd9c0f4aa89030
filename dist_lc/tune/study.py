"""The Optuna study of a tune folder: its storage, sampler and pruner.

Storage: Optuna's ``JournalStorage`` over a ``JournalFileBackend`` in ``DIR/study.journal``, an
append-only log of the study's operations: no database server, and its default lock (a symbolic
link) works on a shared filesystem, so a launcher on a login node and a report on another machine
read the same study. Every trial state a launcher recorded survives its death; a trial it had
started is still RUNNING there, and the next launcher continues it (:mod:`.scheduler`).

The sampler is re-created, with the same seed, by every launch; Optuna samplers keep no state
that the study does not hold, so a resumed study samples from all its finished trials.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lc_common.errors import InputError

from . import PRUNERS, SAMPLERS
from .settings import JOURNAL, STUDY_NAME, Settings
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


# ----------------------------------------------------------------------------- samplers

def _tpe(seed: int, space: Space):
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # parallel trials: running ones count


def _random(seed: int, space: Space):
    return optuna.samplers.RandomSampler(seed=seed)


def _qmc(seed: int, space: Space):
    return optuna.samplers.QMCSampler(seed=seed, scramble=True)   # categorical keys: drawn at random


def _cmaes(seed: int, space: Space):
    return optuna.samplers.CmaEsSampler(seed=seed)


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


def make_sampler(name: str, seed: int, space: Space):
    return SAMPLER_TABLE[name](seed, space)


# ----------------------------------------------------------------------------- pruners

def total_steps(settings: Settings) -> int:
    """Steps a trial that runs to its end reports: a block per fold one after another, or one block."""
    folds = len(settings.folds) if settings.fold_order == "sequential" else 1
    return folds * settings.steps_per_fold


def _median(settings: Settings):
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup,
                                       n_warmup_steps=settings.pruner_warmup)


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
    return optuna.create_study(storage=storage(settings.out), study_name=STUDY_NAME, direction="minimize",
                               sampler=make_sampler(settings.sampler, settings.seed, settings.search_space),
                               pruner=PRUNER_TABLE[settings.pruner](settings), load_if_exists=True)


def load_trials(out: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's trials, read without a sampler or a pruner (the report)."""
    quiet()
    return optuna.load_study(study_name=STUDY_NAME, storage=storage(out)).get_trials(deepcopy=False)


def load_study(out: Path) -> optuna.Study:
    quiet()
    return optuna.load_study(study_name=STUDY_NAME, storage=storage(out))


def reopen(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A handle on a trial that an earlier launcher started, to report to and prune it. Optuna
    offers no public way from a trial's number to its handle; the storage's id is what ask() wraps."""
    return optuna.Trial(study, frozen._trial_id)
