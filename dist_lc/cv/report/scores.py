"""The report's figures from stage 1's tables: each fold's row and each grid point's block of
report.json, the best point, the grid's ranking.

``mean_kl ± std_kl`` over folds of each fold's best validation KL (from training; std with ddof=1,
None under 2 folds); ``oof_kl`` all out-of-fold tiles scored together
(:func:`dist_lc.metrics.kl_per_sample`) with its per-class contributions; ``baseline_kl`` the same
tiles predicted by the mean scored proportions of their fold's training folds. Tiles whose truth
holds no scored class (clouds/no_data only) have no score and are left out, as in training's
validation. A fold without a finite best validation KL makes its point's mean non-finite: such a
point is unscored, ranked after every scored one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ... import pixel_metrics
from ...metrics import best_constant, has_scored_class, kl_per_class, kl_per_sample
from .tables import CLASSES, FoldTables, PointTables


@dataclass(frozen=True)
class Score:
    kl: float | None            # None when no tile is scored
    per_class: dict             # each scored class's contribution to kl
    tiles: int                  # tiles scored
    unscored: int               # tiles left out: no scored class in their truth


def score(truth: pd.DataFrame, pred: pd.DataFrame) -> Score:
    """KL of predicted tiles against the truth (tiles with no scored class left out)."""
    y = truth.loc[pred.index, CLASSES].to_numpy(np.float64)
    scored = has_scored_class(y)
    y_true, y_pred = y[scored], pred.to_numpy(np.float64)[scored]
    unscored = int((~scored).sum())
    if not len(y_true):
        return Score(None, {}, 0, unscored)
    return Score(float(kl_per_sample(y_true, y_pred).mean()), kl_per_class(y_true, y_pred), int(scored.sum()),
                 unscored)


def baseline(truth: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    """Each tile predicted by the mean scored proportions of the tiles of the other folds (its training
    folds): the best constant prediction those folds give."""
    rows = []
    for fold, group in truth.loc[ids].groupby("fold"):
        prior = best_constant(truth.loc[truth["fold"] != fold, CLASSES])
        rows.append(pd.DataFrame(np.tile(prior, (len(group), 1)), index=group.index, columns=CLASSES))
    return pd.concat(rows).loc[ids]


def fold_row(fold: FoldTables, truth: pd.DataFrame) -> dict:
    """A finished fold's figures: its done.json's and its out-of-fold score."""
    done, oof = fold.done, score(truth, fold.oof)
    return {"fold": fold.fold, "status": "done", "best_epoch": done["best_epoch"], "best_val_kl": done["best_val_kl"],
            "pixel": pixel_metrics.summary(fold.confusion) if fold.confusion is not None else None,
            "final_train_loss": done["final_train_loss"], "epochs_done": done["epochs_done"],
            "epochs": done["epochs"], "stop_reason": done.get("stop_reason"), "oof_kl": oof.kl, "oof_tiles": oof.tiles,
            "train_s": round(done["train_s"], 1), "predict_s": round(done["predict_s"], 1),
            "world_size": done["world_size"], "job_id": done.get("job_id"), "run_dir": str(fold.run_dir),
            "timeline": done.get("timeline")}


def point_block(tables: PointTables, truth: pd.DataFrame) -> dict:
    """Fold table, mean ± std, out-of-fold and baseline scores of one grid point."""
    block = {"name": tables.point.name, "params": tables.point.params,
             "folds": [fold_row(f, truth) for f in tables.folds], "missing_folds": tables.missing,
             "complete": not tables.missing}
    if not tables.folds:
        return {**block, "mean_kl": None, "std_kl": None, "oof_kl": None, "baseline_kl": None}
    scores = np.array([np.nan if f.done["best_val_kl"] is None else f.done["best_val_kl"] for f in tables.folds],
                      dtype=np.float64)
    oof, base = score(truth, tables.oof), score(truth, baseline(truth, tables.oof.index))
    confusion = pooled_confusion(tables.folds)
    return {**block, "mean_kl": float(scores.mean()), "std_kl": float(scores.std(ddof=1)) if len(scores) > 1 else None,
            "oof_kl": oof.kl, "oof_tiles": oof.tiles, "oof_unscored_tiles": oof.unscored,
            "per_class": oof.per_class, "baseline_kl": base.kl, "baseline_per_class": base.per_class,
            "oof_pixel": pixel_metrics.summary(confusion) if confusion is not None else None,
            "oof_confusion": confusion.tolist() if confusion is not None else None}


def pooled_confusion(folds: list[FoldTables]) -> np.ndarray | None:
    """The folds' pixel confusion matrices summed; None unless every fold has one (a partial sum would
    pass for all the out-of-fold pixels)."""
    matrices = [f.confusion for f in folds if f.confusion is not None]
    return sum(matrices) if matrices and len(matrices) == len(folds) else None


@dataclass(frozen=True)
class Ranking:
    """The grid points best first: the one order that names the best point and ranks the grid.
    ``shared_folds``: the folds the scored points with unfinished folds were compared on; None when
    there is no such point, [] when they share none (then each is ranked by its own mean)."""
    blocks: list[dict]
    shared_folds: list[int] | None


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def rank(blocks: list[dict]) -> Ranking:
    """Complete points by mean validation KL; then the points with unfinished folds, by their mean
    over the folds that all of them finished (their own means would pit easy folds against hard
    ones), or their own means when they share none; then the unscored points (no finished fold, or a
    non-finite KL), in the plan's order."""
    scored = [b for b in blocks if finite(b["mean_kl"])]
    partial = [b for b in scored if not b["complete"]]
    shared = sorted(set.intersection(*({r["fold"] for r in b["folds"]} for b in partial))) if partial else None

    def key(block: dict) -> tuple:
        if not finite(block["mean_kl"]):
            return 2, not block["folds"], 0.0
        if block["complete"] or not shared:
            return (0 if block["complete"] else 1), False, block["mean_kl"]
        return 1, False, float(np.mean([r["best_val_kl"] for r in block["folds"] if r["fold"] in shared]))

    return Ranking(sorted(blocks, key=key), shared)


def best_point(blocks: list[dict]) -> dict:
    """The first of :func:`rank` with a finished fold (the report of a folder without one is refused
    before this)."""
    return next(b for b in rank(blocks).blocks if b["folds"])
