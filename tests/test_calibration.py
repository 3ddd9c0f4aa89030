"""Calibration of tile proportions (dist_lc.calibration) on the real sample's true proportions."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dist_lc import calibration
from dist_lc.metrics import SCORED_CLASSES, kl_score, scored_proportions
from lc_common.tiles import CLASS_NAMES


@pytest.fixture(scope="module")
def truth(sample_root):
    """True proportions of the sample's 300 train tiles (10 columns), from the official labels."""
    labels = pd.read_csv(sample_root / "train_labels.csv", dtype={"sample_id": str}).set_index("sample_id")
    ids = sorted(p.stem for p in (sample_root / "train" / "images").glob("*.tif"))
    y = labels.loc[ids, list(CLASS_NAMES)]
    y = y.to_numpy(np.float64)
    return y[scored_proportions(y).sum(axis=1) > 0]


def distort(y, scale, bias, seed=0):
    """Predictions that are the truth blurred by noise, then sharpened/flattened and shifted per class."""
    rng = np.random.default_rng(seed)
    z = np.log(scored_proportions(y) + 1e-3) + rng.normal(0, 0.3, (len(y), len(SCORED_CLASSES)))
    z = scale * z + bias
    q = np.exp(z - z.max(axis=1, keepdims=True))
    out = np.zeros_like(y)
    out[:, list(SCORED_CLASSES)] = q / q.sum(axis=1, keepdims=True)
    return out


def test_apply_gives_proportions_over_the_scored_classes(truth):
    pred = distort(truth, 0.5, np.linspace(-1, 1, 8))
    cal = calibration.Calibration(1.3, list(np.linspace(0.5, -0.5, 8)))
    out = cal.apply(pred)
    assert out.shape == pred.shape
    assert np.allclose(out.sum(axis=1), 1.0)
    assert (out[:, [0, 1]] == 0).all() and (out[:, list(SCORED_CLASSES)] > 0).all()


def test_identity_leaves_proportions_unchanged_up_to_epsilon(truth):
    pred = distort(truth, 1.0, np.zeros(8))
    out = calibration.IDENTITY.apply(pred)[:, list(SCORED_CLASSES)]
    assert np.allclose(out, scored_proportions(pred), atol=1e-6)


def test_fit_undoes_a_systematic_miscalibration(truth):
    pred = distort(truth, 0.4, np.array([1.5, -1.0, 0.5, 0.0, -0.5, 1.0, -1.5, 0.2]))
    cal = calibration.fit(truth, pred)
    before, after = kl_score(truth, pred), kl_score(truth, cal.apply(pred))
    assert after < 0.5 * before
    assert cal.scale > 1.5   # predictions were too flat: calibration sharpens them


def test_fit_on_calibrated_predictions_stays_near_identity(truth):
    pred = distort(truth, 1.0, np.zeros(8))
    cal = calibration.fit(truth, pred)
    assert kl_score(truth, cal.apply(pred)) <= kl_score(truth, pred) + 1e-4
    assert abs(cal.scale - 1) < 0.3


def test_cross_fitted_calibrates_each_fold_with_the_other_folds_only(truth):
    pred = distort(truth, 0.4, np.array([1.5, -1.0, 0.5, 0.0, -0.5, 1.0, -1.5, 0.2]))
    folds = np.arange(len(truth)) % 5
    out = calibration.cross_fitted(truth, pred, folds)
    mine = folds == 2
    expected = calibration.fit(truth[~mine], pred[~mine]).apply(pred[mine])
    assert np.allclose(out[mine], expected)
    assert kl_score(truth, out) < 0.6 * kl_score(truth, pred)


def test_non_finite_predictions_are_left_out_of_the_fit(truth):
    pred = distort(truth, 0.4, np.array([1.5, -1.0, 0.5, 0.0, -0.5, 1.0, -1.5, 0.2]))
    clean = calibration.fit(truth, pred)
    pred[3] = np.nan
    cal = calibration.fit(truth, pred)
    assert np.isfinite(cal.scale) and np.isfinite(cal.bias).all()
    assert cal.scale == pytest.approx(clean.scale, rel=0.05)


def test_second_stage_undoes_a_distortion_that_depends_on_a_tile_feature():
    """Proportions squashed toward uniform on tiles whose feature is high, sharpened elsewhere: a
    per-class calibration cannot undo both, the boosted correction (which sees the feature) can."""
    from dist_lc import second_stage

    rng = np.random.default_rng(0)
    n = 400
    truth = np.zeros((n, 10))
    truth[:, 2:] = rng.dirichlet(np.full(8, 0.6), size=n)
    feature = rng.random((n, 1))
    logits = np.log(truth[:, 2:] + 1e-3)
    temperature = np.where(feature[:, 0] > 0.5, 4.0, 0.5)[:, None]
    pred = np.zeros((n, 10))
    pred[:, 2:] = np.exp(logits / temperature) / np.exp(logits / temperature).sum(axis=1, keepdims=True)
    folds = np.arange(n) % 4
    plain = kl_score(truth, pred)
    calibrated = kl_score(truth, calibration.cross_fitted(truth, pred, folds))
    staged = kl_score(truth, second_stage.cross_fitted(truth, pred, feature, folds))
    assert staged < 0.5 * calibrated and calibrated < plain


def test_a_correction_cross_fitted_over_one_fold_changes_nothing():
    """No other fold to learn from: a fit on no tile is the identity, the second stage's as the calibration's."""
    from dist_lc import second_stage

    rng = np.random.default_rng(0)
    truth, pred = np.zeros((20, 10)), np.zeros((20, 10))
    truth[:, 2:], pred[:, 2:] = rng.dirichlet(np.ones(8), size=20), rng.dirichlet(np.ones(8), size=20)
    folds = np.zeros(20, dtype=int)
    np.testing.assert_allclose(second_stage.cross_fitted(truth, pred, np.zeros((20, 3)), folds), pred, atol=1e-6)
    np.testing.assert_allclose(calibration.cross_fitted(truth, pred, folds), pred, atol=1e-6)


def test_cross_fit_fits_on_the_other_folds_and_applies_to_its_own():
    folds = np.array([0, 0, 1, 2, 2])
    seen = []

    def fit(rows):
        seen.append(rows.copy())
        return lambda mine: np.full((mine.sum(), 10), float(rows.sum()))

    out = calibration.cross_fit(folds, fit)
    assert [r.tolist() for r in seen] == [[False, False, True, True, True], [True, True, False, True, True],
                                          [True, True, True, False, False]]
    assert out[:, 0].tolist() == [3, 3, 4, 3, 3]


def test_fit_is_the_minimum_of_its_objective(truth):
    """No step of any of the 9 parameters lowers mean KL + the pull toward identity: the fit is the optimum."""
    pred = distort(truth, 0.6, np.linspace(-1, 1, 8), seed=3)

    def objective(scale, bias):
        cal = calibration.Calibration(scale, list(bias))
        y = scored_proportions(truth) + calibration.EPSILON
        y /= y.sum(axis=1, keepdims=True)
        q = scored_proportions(cal.apply(pred))
        return (y * np.log(y / q)).sum(axis=1).mean() + calibration.L2 * (np.log(scale) ** 2 + (bias ** 2).sum())

    cal = calibration.fit(truth, pred)
    best = objective(cal.scale, np.array(cal.bias))
    for i in range(9):
        for step in (-1e-3, 1e-3):
            x = np.concatenate([[np.log(cal.scale)], cal.bias])
            x[i] += step
            assert objective(np.exp(x[0]), x[1:]) >= best - 1e-12, (i, step)
