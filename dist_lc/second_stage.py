"""A second stage that corrects an ensemble's tile proportions non-linearly, fitted on out-of-fold tiles.

Gradient-boosted trees (LightGBM) over the 8 scored classes, started from the model's own
log-proportions (``init_score = log(p + 1e-7)``): each round adds a small, tree-shaped correction to
the 8 logits, whose softmax is the corrected prediction. The inputs are those log-proportions and
the tile's cheap features (:mod:`dist_lc.tile_features`: band and NDVI/NDWI statistics, a histogram
of pixel types). The objective is the cross-entropy against the true proportions (soft labels),
which differs from the challenge's KL by the truth's entropy only: the trees minimise the score.
Small trees, shrinkage, row and feature subsampling keep it from learning the few hundred tiles of
a small set by heart; its effect is judged cross-fitted, like the calibration's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .calibration import cross_fit
from .metrics import EPSILON, SCORED_CLASSES, expand_scored, has_scored_class, scored_proportions

ROUNDS = 100
PARAMS = {"learning_rate": 0.05, "num_leaves": 4, "min_data_in_leaf": 15, "lambda_l2": 1.0,
          "feature_fraction": 0.7, "bagging_fraction": 0.8, "bagging_freq": 1, "seed": 0,
          "num_threads": 1, "verbose": -1}
MIN_TILES = 50   # a cross-fit whose smallest fit has fewer tiles: no second stage


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    q = np.exp(z)
    return q / q.sum(axis=1, keepdims=True)


def _inputs(pred, features) -> tuple[np.ndarray, np.ndarray]:
    init = np.log(scored_proportions(pred) + EPSILON)
    return np.column_stack([init, features]), init


def _objective(target: np.ndarray):
    """LightGBM's custom multiclass objective: soft-label cross-entropy (grad q − y, hess q(1 − q)).
    LightGBM 4 passes the raw scores as (tiles, classes)."""
    def soft_cross_entropy(raw, dataset):
        q = _softmax(raw)
        return q - target, np.maximum(q * (1.0 - q), 1e-6)
    return soft_cross_entropy


@dataclass
class SecondStage:
    booster: object | None   # None: fitted on no tile, so it corrects nothing

    def apply(self, pred, features) -> np.ndarray:
        """(n, 10) corrected proportions from (n, 10) predictions and their tiles' features."""
        x, init = _inputs(pred, features)
        raw = init if self.booster is None else init + self.booster.predict(x, raw_score=True)
        return expand_scored(_softmax(raw))


def fit(truth, pred, features, rounds: int = ROUNDS) -> SecondStage:
    """The boosted correction of ``pred`` towards ``truth`` (tiles without a scored class left out)."""
    import lightgbm as lgb

    y = scored_proportions(truth)
    keep = has_scored_class(truth) & np.isfinite(scored_proportions(pred)).all(axis=1)
    if not keep.any():   # LightGBM refuses an empty set; with nothing to learn from, change nothing
        return SecondStage(None)
    x, init = _inputs(np.asarray(pred)[keep], np.asarray(features)[keep])
    target = (y[keep] + EPSILON) / (y[keep] + EPSILON).sum(axis=1, keepdims=True)
    data = lgb.Dataset(x, label=np.zeros(len(x)), init_score=init, free_raw_data=False)
    params = {**PARAMS, "num_class": len(SCORED_CLASSES), "objective": _objective(target)}
    return SecondStage(lgb.train(params, data, num_boost_round=rounds))


def cross_fitted(truth, pred, features, folds, rounds: int = ROUNDS) -> np.ndarray:
    """Each fold's predictions corrected by a second stage fitted on the other folds' tiles."""
    truth, pred, features = map(np.asarray, (truth, pred, features))

    def fit_on(rows: np.ndarray):
        stage = fit(truth[rows], pred[rows], features[rows], rounds)
        return lambda mine: stage.apply(pred[mine], features[mine])

    return cross_fit(folds, fit_on)
