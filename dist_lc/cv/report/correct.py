"""Stage 2 of the report: the corrections of the best grid point's out-of-fold predictions, and the
choice between them. Nothing is written here (stage 3 writes what this returns).

Each correction is scored cross-fitted (each fold corrected by a fit on the other folds), so that
it is not scored on the tiles it was fitted on: the calibration (``cv.calibrate``,
:mod:`dist_lc.calibration`) and the second stage (``cv.second_stage``, :mod:`dist_lc.second_stage`).
The submission takes the one with the lowest cross-fitted out-of-fold KL, or none when the
uncorrected predictions score lower; that one is then fitted on every out-of-fold tile of the point.
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Candidate:
    """One correction as report.json records it (before the choice), what it made of the out-of-fold
    tiles, and how to fit it on all of them."""
    record: dict
    crossed: pd.DataFrame | None = None         # cross-fitted out-of-fold predictions; None: not fitted
    fit: Callable[[], Correct] | None = None

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
    """Both corrections scored, the choice between them, the chosen one fitted."""
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
                       candidates[chosen].fit() if chosen != NONE else None)


def choose(uncorrected_kl: float | None, corrected_kl: dict[str, float | None]) -> str:
    """The correction with the lowest cross-fitted out-of-fold KL; NONE when no correction beats the
    uncorrected predictions (a tie keeps the one named first, NONE before any)."""
    options = {NONE: uncorrected_kl, **corrected_kl}
    scored = {name: kl for name, kl in options.items() if kl is not None}
    return min(scored, key=scored.get) if scored else NONE


def decided(record: dict, name: str, chosen: str) -> dict:
    """A scored correction's record with the choice written in (a new dict); others as they are."""
    if record.get("oof_kl") is None:
        return record
    reason = ("lowest cross-fitted oof KL: applied to submission.csv" if chosen == name else
              f"not applied: {chosen.replace('_', ' ')} scores lower cross-fitted")
    return {**record, "applied": chosen == name, "reason": reason}


def calibration_candidate(enabled: bool, oof: OutOfFold, finished: int, truth: pd.DataFrame) -> Candidate:
    if not enabled:
        return Candidate({"enabled": False, "applied": False, "reason": "cv.calibrate is false"})
    if finished < 2:
        return Candidate({"enabled": True, "applied": False, "reason": "needs at least 2 finished folds"})
    crossed = _like(calibration.cross_fitted(oof.truth, oof.pred, oof.folds), oof.table)
    fitted = calibration.fit(oof.truth, oof.pred)
    crossed_score = score(truth, crossed)

    def fit() -> Correct:   # fitted above already: its parameters are part of the record
        return lambda table: _like(fitted.apply(table.to_numpy(np.float64)), table)

    return Candidate({"enabled": True, "applied": False, "oof_kl": crossed_score.kl,
                      "per_class": crossed_score.per_class, "params": fitted.to_dict()}, crossed, fit)


def second_stage_candidate(enabled: bool, oof: OutOfFold, finished: int, truth: pd.DataFrame,
                           read_features: Callable[[], pd.DataFrame]) -> Candidate:
    """``read_features`` is called only when the second stage is fitted: a pass over every image."""
    if not enabled:
        return Candidate({"enabled": False, "applied": False, "reason": "cv.second_stage is false"})
    if finished < 2 or len(oof.table) < second_stage.MIN_TILES:
        return Candidate({"enabled": True, "applied": False, "reason": f"needs at least 2 finished folds and "
                          f"{second_stage.MIN_TILES} out-of-fold tiles (has {finished} and {len(oof.table)})"})
    features = read_features()
    mine = features.loc[oof.table.index].to_numpy()
    crossed = _like(second_stage.cross_fitted(oof.truth, oof.pred, mine, oof.folds), oof.table)
    crossed_score = score(truth, crossed)

    def fit() -> Correct:
        stage = second_stage.fit(oof.truth, oof.pred, mine)
        return lambda table: _like(stage.apply(table.to_numpy(np.float64), features.loc[table.index].to_numpy()),
                                   table)

    return Candidate({"enabled": True, "applied": False, "oof_kl": crossed_score.kl,
                      "per_class": crossed_score.per_class, "rounds": second_stage.ROUNDS,
                      "features": mine.shape[1] + 8}, crossed, fit)


def _like(values: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """(n, 10) proportions as a prediction table on ``table``'s tiles."""
    return pd.DataFrame(values, index=table.index, columns=CLASSES)
