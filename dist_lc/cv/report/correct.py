"""Stage 2 of the report: the corrections of the best grid point's out-of-fold predictions, and the
choice between them. Nothing is written here (stage 3 writes what this returns).

Each correction is scored cross-fitted (each fold corrected by a fit on the other folds), so that
it is not scored on the tiles it was fitted on: the calibration (``cv.calibrate``,
:mod:`dist_lc.calibration`) and the second stage (``cv.second_stage``, :mod:`dist_lc.second_stage`).
The submission takes the one with the lowest cross-fitted out-of-fold KL, or none when the
uncorrected predictions score lower; that one is then fitted on every out-of-fold tile of the point.

The lowest of several noisy scores is biased low, so the winner's own score flatters the choice.
:func:`nested_choice` scores the whole procedure instead: for each fold, the options are
cross-fitted over the other folds alone, the choice is made there, and the chosen correction,
fitted on those folds, corrects the fold. Its out-of-fold KL is the honest one.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from ... import calibration, second_stage
from ..plan import Plan
from .scores import score
from .tables import CLASSES, PointTables, read_tile_features

NONE = "none"
Correct = Callable[[pd.DataFrame], pd.DataFrame]   # a prediction table → the corrected table
Needs = Callable[[int, int], str | None]           # (folds, tiles of its smallest fit) → why it cannot be fitted, or None


@dataclass(frozen=True)
class Candidate:
    """One correction as report.json records it (before the choice), what it made of the out-of-fold
    tiles, how to fit it on all of them, and how to fit it on some of them (for the nested score)."""
    record: dict
    crossed: pd.DataFrame | None = None         # cross-fitted out-of-fold predictions; None: not fitted
    fit: Callable[[], Correct] | None = None
    fit_on: calibration.Fit | None = None       # rows of the out-of-fold table → fitted on them, applied to rows
    needs: Needs | None = None

    @property
    def oof_kl(self) -> float | None:
        return self.record.get("oof_kl")


@dataclass(frozen=True)
class Corrections:
    """What stage 2 hands to stage 3."""
    calibration: dict                 # report.json's "calibration", with the choice (applied, reason)
    second_stage: dict                # report.json's "second_stage", likewise
    chosen: str                       # NONE, "calibration" or "second_stage"
    crossed: dict[str, pd.DataFrame]  # correction → its cross-fitted out-of-fold table (those fitted)
    correct: Correct | None           # the chosen correction, fitted on every out-of-fold tile
    nested: dict | None               # report.json's "choice_nested"; None when no correction was scored


@dataclass(frozen=True)
class OutOfFold:
    """The point's out-of-fold tiles as the fits take them."""
    table: pd.DataFrame   # predictions
    truth: np.ndarray     # (n, 10) true proportions
    folds: np.ndarray     # each tile's fold

    @property
    def pred(self) -> np.ndarray:
        return self.table.to_numpy(np.float64)


def corrections(plan: Plan, tables: PointTables, uncorrected_kl: float | None, truth: pd.DataFrame) -> Corrections:
    """Both corrections scored, the choice between them, the chosen one fitted, the choice's nested score."""
    oof = OutOfFold(tables.oof, truth.loc[tables.oof.index, CLASSES].to_numpy(np.float64),
                    truth.loc[tables.oof.index, "fold"].to_numpy())
    config, finished = plan.config, len(tables.folds)
    candidates = {"calibration": calibration_candidate(config.cv.calibrate, oof, finished, truth),
                  "second_stage": second_stage_candidate(
                      config.cv.second_stage, oof, finished, truth,
                      lambda: read_tile_features(plan.cv_dir, config.data.shards))}
    chosen = choose(uncorrected_kl, {name: c.oof_kl for name, c in candidates.items()})
    records = {name: decided(c.record, name, chosen) for name, c in candidates.items()}
    return Corrections(records["calibration"], records["second_stage"], chosen,
                       {name: c.crossed for name, c in candidates.items() if c.crossed is not None},
                       candidates[chosen].fit() if chosen != NONE else None,
                       nested_choice(oof, truth, candidates))


def choose(uncorrected_kl: float | None, corrected_kl: dict[str, float | None]) -> str:
    """The correction with the lowest cross-fitted out-of-fold KL; NONE when no correction beats the
    uncorrected predictions (a tie keeps the one named first, NONE before any). A score that is None
    or not finite takes no part (a NaN would win or lose every comparison by accident)."""
    options = {NONE: uncorrected_kl, **corrected_kl}
    scored = {name: kl for name, kl in options.items() if kl is not None and math.isfinite(kl)}
    return min(scored, key=scored.get) if scored else NONE


def decided(record: dict, name: str, chosen: str) -> dict:
    """A scored correction's record with the choice written in (a new dict); others as they are."""
    if record.get("oof_kl") is None:
        return record
    if chosen == name:
        reason = "lowest cross-fitted oof KL: applied to submission.csv"
    elif chosen == NONE:
        reason = "not applied: the uncorrected predictions score lower than it cross-fitted"
    else:
        reason = f"not applied: {chosen.replace('_', ' ')} scores lower cross-fitted"
    return {**record, "applied": chosen == name, "reason": reason}


def nested_choice(oof: OutOfFold, truth: pd.DataFrame, candidates: dict[str, Candidate]) -> dict | None:
    """The out-of-fold score of choosing, each fold corrected by what the choice makes of the other
    folds alone: there every scored option is cross-fitted (an option that cannot be fitted on them
    takes no part), :func:`choose` picks, and the pick, fitted on those folds, corrects the fold.
    None when no correction was scored (then nothing was chosen, and the uncorrected score stands)."""
    scored = {name: c for name, c in candidates.items() if c.crossed is not None}
    if not scored:
        return None
    folds = np.unique(oof.folds)
    # One fit on the folds other than j and k serves both outer fold k (applied to j) and outer fold j
    # (applied to k): K(K-1)/2 fits per option instead of K(K-1).
    pairs = {}
    for name, c in scored.items():
        for j, k in itertools.combinations(folds, 2):
            pairs[name, j, k] = pairs[name, k, j] = c.fit_on(~np.isin(oof.folds, (j, k)))
    nested, choices = oof.pred.copy(), {}
    for k in folds:
        inner = oof.folds != k
        kls = {}
        for name, c in scored.items():
            if c.needs(len(folds) - 1, smallest_fit(oof.folds[inner])) is None:
                crossed = np.zeros_like(nested)
                for j in folds[folds != k]:
                    crossed[oof.folds == j] = pairs[name, j, k](oof.folds == j)
                kls[name] = score(truth, _like(crossed[inner], oof.table[inner])).kl
        choices[int(k)] = choose(score(truth, oof.table[inner]).kl, kls)
        if choices[int(k)] != NONE:   # the chosen one fitted on the folds other than k: its cross-fitted fold k
            nested[~inner] = scored[choices[int(k)]].crossed.to_numpy()[~inner]
    result = score(truth, _like(nested, oof.table))
    return {"oof_kl": result.kl, "per_class": result.per_class, "tiles": result.tiles,
            "choices": {str(k): name for k, name in choices.items()}}


def smallest_fit(folds: np.ndarray) -> int:
    """The fewest tiles a fit of a cross-fit over tiles of these folds is given: all but the largest fold's."""
    _, counts = np.unique(folds, return_counts=True)
    return int(len(folds) - counts.max()) if len(counts) else 0


def calibration_needs(folds: int, tiles: int) -> str | None:
    return None if folds >= 2 else "needs at least 2 finished folds"


def second_stage_needs(folds: int, tiles: int) -> str | None:
    if folds >= 2 and tiles >= second_stage.MIN_TILES:
        return None
    return (f"needs at least 2 finished folds and {second_stage.MIN_TILES} tiles in each cross-fitted fit "
            f"(has {folds} folds, and {tiles} tiles in its smallest fit)")


def calibration_candidate(enabled: bool, oof: OutOfFold, finished: int, truth: pd.DataFrame) -> Candidate:
    if not enabled:
        return Candidate({"enabled": False, "applied": False, "reason": "cv.calibrate is false"})
    if (why := calibration_needs(finished, smallest_fit(oof.folds))) is not None:
        return Candidate({"enabled": True, "applied": False, "reason": why})

    def fit_on(rows: np.ndarray):
        fitted = calibration.fit(oof.truth[rows], oof.pred[rows])
        return lambda mine: fitted.apply(oof.pred[mine])

    crossed = _like(calibration.cross_fit(oof.folds, fit_on), oof.table)
    fitted = calibration.fit(oof.truth, oof.pred)
    crossed_score = score(truth, crossed)

    def fit() -> Correct:   # fitted above already: its parameters are part of the record
        return lambda table: _like(fitted.apply(table.to_numpy(np.float64)), table)

    return Candidate({"enabled": True, "applied": False, "oof_kl": crossed_score.kl,
                      "per_class": crossed_score.per_class, "params": fitted.to_dict()}, crossed, fit, fit_on,
                     calibration_needs)


def second_stage_candidate(enabled: bool, oof: OutOfFold, finished: int, truth: pd.DataFrame,
                           read_features: Callable[[], pd.DataFrame]) -> Candidate:
    """``read_features`` is called only when the second stage is fitted: a pass over every image."""
    if not enabled:
        return Candidate({"enabled": False, "applied": False, "reason": "cv.second_stage is false"})
    if (why := second_stage_needs(finished, smallest_fit(oof.folds))) is not None:
        return Candidate({"enabled": True, "applied": False, "reason": why})
    features = read_features()
    mine = features.loc[oof.table.index].to_numpy()

    def fit_on(rows: np.ndarray):
        stage = second_stage.fit(oof.truth[rows], oof.pred[rows], mine[rows])
        return lambda applied: stage.apply(oof.pred[applied], mine[applied])

    crossed = _like(calibration.cross_fit(oof.folds, fit_on), oof.table)
    crossed_score = score(truth, crossed)

    def fit() -> Correct:
        stage = second_stage.fit(oof.truth, oof.pred, mine)
        return lambda table: _like(stage.apply(table.to_numpy(np.float64), features.loc[table.index].to_numpy()),
                                   table)

    return Candidate({"enabled": True, "applied": False, "oof_kl": crossed_score.kl,
                      "per_class": crossed_score.per_class, "rounds": second_stage.ROUNDS,
                      "features": mine.shape[1] + 8}, crossed, fit, fit_on, second_stage_needs)


def _like(values: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """(n, 10) proportions as a prediction table on ``table``'s tiles."""
    return pd.DataFrame(values, index=table.index, columns=CLASSES)
