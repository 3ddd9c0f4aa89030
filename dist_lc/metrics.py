"""The challenge's score, the only implementation in the project (validation, CV reports, eval).

ENS Challenge Data 2021 (Preligens): drop the no_data and clouds columns, renormalise each row,
add 1e-7 to both sides, then the mean over samples of sum_c y_c * log(y_c / yhat_c).
"""
from __future__ import annotations

import numpy as np

from lc_common.tiles import CLASS_NAMES, IGNORED_CLASSES, NUM_CLASSES

EPSILON = 1e-7
SCORED_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in IGNORED_CLASSES)
SCORED_NAMES = tuple(CLASS_NAMES[c] for c in SCORED_CLASSES)


def scored_proportions(p) -> np.ndarray:
    """Rows restricted to the 8 scored classes and renormalised (accepts 10 or 8 columns)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] not in (NUM_CLASSES, len(SCORED_CLASSES)):
        raise ValueError(f"expected (n, {NUM_CLASSES}) or (n, {len(SCORED_CLASSES)}) proportions, got {p.shape}")
    if p.shape[1] == NUM_CLASSES:
        p = p[:, SCORED_CLASSES]
    with np.errstate(invalid="ignore", divide="ignore"):
        return p / p.sum(axis=1, keepdims=True)


def has_scored_class(truth) -> np.ndarray:
    """Which tiles' true proportions hold a scored class (``(n, 10)`` or ``(n, 8)`` rows): a tile of
    no_data and clouds only has no score, so every scorer and every fit on scores leaves it out."""
    return np.isfinite(scored_proportions(truth)).all(axis=1)   # a row summing to 0 renormalises to NaN


def kl_terms(y_true, y_pred) -> np.ndarray:
    """Per-sample, per-scored-class terms y*log(y/yhat), shape (n, 8). Sum over classes = per-sample KL."""
    t = scored_proportions(y_true) + EPSILON
    p = scored_proportions(y_pred) + EPSILON
    return t * np.log(t / p)


def kl_per_sample(y_true, y_pred) -> np.ndarray:
    return kl_terms(y_true, y_pred).sum(axis=1)


def kl_score(y_true, y_pred) -> float:
    """The challenge's score (lower is better)."""
    return float(kl_per_sample(y_true, y_pred).mean())


def kl_per_class(y_true, y_pred) -> dict[str, float]:
    """Each scored class's contribution to the score; the values add up to :func:`kl_score`."""
    terms = kl_terms(y_true, y_pred).mean(axis=0)
    return {name: float(v) for name, v in zip(SCORED_NAMES, terms)}


def expand_scored(p8) -> np.ndarray:
    """(n, 10) rows from (n, 8) scored proportions: 0 for no_data and clouds, the rest renormalised."""
    p8 = np.asarray(p8, dtype=np.float64)
    out = np.zeros((len(p8), NUM_CLASSES))
    out[:, list(SCORED_CLASSES)] = p8 / p8.sum(axis=1, keepdims=True)
    return out


def best_constant(truth) -> np.ndarray:
    """The one prediction (10,) that scores best on every tile of ``truth`` (``(n, 10)`` rows): the
    mean of their scored proportions, tiles without a scored class left out. (The mean of the raw
    rows is another distribution wherever no_data or clouds cover part of a tile, and scores worse.)
    NaN where no tile has a scored class: there is nothing to predict, and no score."""
    truth = np.asarray(truth, dtype=np.float64)
    scored = scored_proportions(truth)[has_scored_class(truth)]
    if not len(scored):
        return np.full(NUM_CLASSES, np.nan)
    return expand_scored(scored.mean(axis=0, keepdims=True))[0]
