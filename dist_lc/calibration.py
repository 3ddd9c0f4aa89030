"""Calibration of predicted tile proportions, fitted on out-of-fold predictions.

A tile's 8 scored proportions ``p`` become ``softmax(scale · log(p + 1e-7) + bias)``: one
temperature (``1 / scale``) and one bias per scored class, 9 numbers fitted by minimising the mean
KL divergence to the true proportions (the challenge's score) with a small L2 pull toward the
identity (``scale = 1``, ``bias = 0``). It corrects what a U-Net trained for a few epochs gets
wrong systematically: proportions too sharp or too flat, a class under- or over-predicted.

The CV report fits it on every out-of-fold tile and applies it to each fold model's test
predictions before they are averaged;
its out-of-fold score *with* calibration is cross-fitted (each fold calibrated by a fit on the
other folds), so that it is not scored on the tiles it was fitted on. :func:`cross_fit` is that
loop for any correction fitted on out-of-fold tiles (the second stage's too).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import scipy.optimize

from lc_common.tiles import NUM_CLASSES

from .metrics import EPSILON, SCORED_CLASSES, expand_scored, has_scored_class, scored_proportions

L2 = 1e-3   # pull toward the identity; small against a mean KL of ~1e-2


@dataclass
class Calibration:
    scale: float
    bias: list          # one per scored class (dist_lc.metrics.SCORED_NAMES)

    def apply(self, pred) -> np.ndarray:
        """(n, 10) calibrated proportions (0 for the unscored classes) from (n, 10) or (n, 8) predictions."""
        logits = self.scale * np.log(scored_proportions(pred) + EPSILON) + np.asarray(self.bias)
        logits -= logits.max(axis=1, keepdims=True)
        return expand_scored(np.exp(logits))

    def to_dict(self) -> dict:
        return asdict(self)


IDENTITY = Calibration(1.0, [0.0] * len(SCORED_CLASSES))


def fit(truth, pred, l2: float = L2) -> Calibration:
    """The calibration minimising mean KL(truth ‖ calibrated pred) (+ ``l2`` × squared distance to identity).

    Tiles whose truth has no scored class are left out, as in the score, and so are non-finite predictions.
    Minimised by L-BFGS on the exact gradient (scipy: torch's optimizers import its compiler on first use,
    seconds for 9 numbers).
    """
    y, p = scored_proportions(truth), scored_proportions(pred)
    keep = has_scored_class(truth) & np.isfinite(p).all(axis=1)
    if not keep.any():
        return IDENTITY
    y = y[keep] + EPSILON
    y = y / y.sum(axis=1, keepdims=True)
    z = np.log(p[keep] + EPSILON)
    entropy = (y * np.log(y)).sum(axis=1).mean()

    def objective(x):
        log_scale, bias = x[0], x[1:]
        logits = np.exp(log_scale) * z + bias
        logits -= logits.max(axis=1, keepdims=True)
        logq = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = entropy - (y * logq).sum(axis=1).mean() + l2 * (x ** 2).sum()
        d_logits = (np.exp(logq) - y) / len(y)   # rows of y sum to 1
        grad = np.concatenate([[np.exp(log_scale) * (d_logits * z).sum()], d_logits.sum(axis=0)]) + 2 * l2 * x
        return loss, grad

    x = scipy.optimize.minimize(objective, np.zeros(1 + z.shape[1]), jac=True, method="L-BFGS-B",
                                options={"maxiter": 500, "gtol": 1e-10, "ftol": 1e-12}).x
    return Calibration(float(np.exp(x[0])), [float(b) for b in x[1:]])


# A correction fitted on some rows of a table of tiles: ``fit(rows)`` (a boolean mask) returns the
# fitted correction as a function of other rows (a mask), which gives their (m, 10) corrected
# proportions. A fit on no row must change nothing (there is no other fold to learn from).
Fit = Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]


def cross_fit(folds, fit: Fit) -> np.ndarray:
    """(n, 10): each fold's rows corrected by ``fit`` on the other folds' rows, so that no row is
    corrected by a fit that saw it (an honest out-of-fold score)."""
    folds = np.asarray(folds)
    out = np.zeros((len(folds), NUM_CLASSES))
    for k in np.unique(folds):
        mine = folds == k
        out[mine] = fit(~mine)(mine)
    return out


def cross_fitted(truth, pred, folds) -> np.ndarray:
    """Each fold's predictions calibrated by a fit on the other folds' (an honest out-of-fold score)."""
    truth, pred = np.asarray(truth), np.asarray(pred)

    def fit_on(rows: np.ndarray):
        fitted = fit(truth[rows], pred[rows])
        return lambda mine: fitted.apply(pred[mine])

    return cross_fit(folds, fit_on)
