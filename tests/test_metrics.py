"""dist_lc.metrics against an independent float64 pandas reference of the challenge's own scoring."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dist_lc import metrics
from dist_lc.metrics import kl_per_class, kl_per_sample, kl_score, kl_terms, expand_scored, scored_proportions

NAMES = ["no_data", "clouds", "artificial", "cultivated", "broadleaf",
         "coniferous", "herbaceous", "natural", "snow", "water"]


def challenge_kl(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The challenge's scoring, written the way its pandas code does it."""
    cols = NAMES if y_true.shape[1] == 10 else NAMES[2:]
    t = pd.DataFrame(y_true, columns=cols, dtype="float64").drop(columns=["no_data", "clouds"], errors="ignore")
    p = pd.DataFrame(y_pred, columns=cols, dtype="float64").drop(columns=["no_data", "clouds"], errors="ignore")
    t = t.div(t.sum(axis=1), axis=0) + 1e-7
    p = p.div(p.sum(axis=1), axis=0) + 1e-7
    return float((t * np.log(t / p)).sum(axis=1).mean())


def random_props(rng, n, cols=10, zeros=0.3):
    x = rng.random((n, cols))
    x[rng.random((n, cols)) < zeros] = 0.0
    x[:, 2] += 1e-3  # keep at least one scored class per row
    return x / x.sum(axis=1, keepdims=True)


@pytest.fixture
def rng():
    return np.random.default_rng(2021)


@pytest.mark.parametrize("cols", [10, 8])
def test_score_matches_reference_on_random_inputs(rng, cols):
    t, p = random_props(rng, 50, cols), random_props(rng, 50, cols, zeros=0.0)
    assert kl_score(t, p) == pytest.approx(challenge_kl(t, p), rel=1e-12)


def test_zeros_in_truth_and_prediction(rng):
    t, p = random_props(rng, 40, zeros=0.6), random_props(rng, 40, zeros=0.6)
    score = kl_score(t, p)
    assert np.isfinite(score) and score > 0
    assert score == pytest.approx(challenge_kl(t, p), rel=1e-12)


def test_a_missed_class_costs_about_16_times_its_share():
    t = np.array([[0, 0, 0.5, 0.5, 0, 0, 0, 0, 0, 0]], dtype=float)
    p = np.array([[0, 0, 1.0, 0.0, 0, 0, 0, 0, 0, 0]], dtype=float)
    assert kl_score(t, p) == pytest.approx(challenge_kl(t, p), rel=1e-12)
    assert kl_score(t, p) == pytest.approx(0.5 * np.log(0.5 / 1e-7) + 0.5 * np.log(0.5 / 1.0), rel=1e-5)


def test_unnormalised_rows_are_renormalised(rng):
    t, p = random_props(rng, 30), random_props(rng, 30)
    scale_t, scale_p = rng.uniform(0.1, 10, (30, 1)), rng.uniform(0.1, 10, (30, 1))
    assert kl_score(t * scale_t, p * scale_p) == pytest.approx(kl_score(t, p), rel=1e-12)
    assert kl_score(t * scale_t, p * scale_p) == pytest.approx(challenge_kl(t * scale_t, p * scale_p), rel=1e-12)


def test_ignored_columns_do_not_matter(rng):
    t, p = random_props(rng, 30), random_props(rng, 30)
    t2, p2 = t.copy(), p.copy()
    t2[:, :2] = rng.random((30, 2)) * 5
    p2[:, :2] = rng.random((30, 2)) * 5
    assert kl_score(t2, p2) == pytest.approx(kl_score(t, p), rel=1e-12)
    assert kl_score(t, p) == pytest.approx(kl_score(t[:, 2:], p[:, 2:]), rel=1e-12)  # 10 vs 8 columns


def test_identical_rows_score_zero(rng):
    t = random_props(rng, 20)
    assert kl_score(t, t) == 0.0
    assert np.all(kl_per_sample(t, t) == 0.0)


def test_per_sample_and_per_class_add_up_to_the_score(rng):
    t, p = random_props(rng, 25), random_props(rng, 25)
    per_class = kl_per_class(t, p)
    assert list(per_class) == NAMES[2:]
    assert sum(per_class.values()) == pytest.approx(kl_score(t, p), rel=1e-12)
    assert kl_per_sample(t, p).mean() == pytest.approx(kl_score(t, p), rel=1e-12)
    assert kl_terms(t, p).shape == (25, 8)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="expected"):
        kl_score(np.ones((3, 9)), np.ones((3, 9)))


def test_expand_scored_gives_submission_rows_without_no_data_and_clouds(rng):
    probs = rng.random((6, 10))
    probs /= probs.sum(axis=1, keepdims=True)
    out = expand_scored(scored_proportions(probs))
    assert out.shape == (6, 10) and np.all(out[:, :2] == 0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out[:, 2:], probs[:, 2:] / probs[:, 2:].sum(axis=1, keepdims=True), rtol=1e-12)
    assert np.all(probs[:, :2] > 0)  # the input is not modified


def test_has_scored_class_leaves_out_tiles_of_clouds_and_no_data_only():
    rows = np.zeros((3, 10))
    rows[0, 0], rows[1, [1, 4]], rows[2, 1] = 1, 0.5, 1
    assert metrics.has_scored_class(rows).tolist() == [False, True, False]
    assert metrics.has_scored_class(rows[:, 2:]).tolist() == [False, True, False]


def test_the_best_constant_is_the_mean_of_the_scored_proportions(rng):
    """The baseline every report prints: no other constant scores better, and the mean of the raw
    rows (other where clouds cover part of a tile) scores worse."""
    truth = rng.dirichlet(np.full(10, 0.5), size=200)
    truth[:50, 1] += 3.0                               # tiles mostly under clouds, over water
    truth[:50, 9] += 1.0
    truth[-1] = [0.4, 0.6] + [0.0] * 8                 # no scored class: left out
    truth /= truth.sum(axis=1, keepdims=True)
    scored = metrics.has_scored_class(truth)

    def kl_of(constant):
        return kl_score(truth[scored], np.tile(constant, (scored.sum(), 1)))

    best = metrics.best_constant(truth)
    assert best[:2].tolist() == [0.0, 0.0] and abs(best.sum() - 1) < 1e-12
    assert kl_of(best) < kl_of(truth.mean(axis=0)) - 0.005
    for c in range(2, 10):
        for step in (-1e-3, 1e-3):
            moved = best.copy()
            moved[c] += step
            assert kl_of(moved / moved.sum()) > kl_of(best)
    assert np.isnan(metrics.best_constant(truth[-1:])).all()   # nothing to average


def test_scored_argmax_is_argmax_over_the_scored_classes_ties_to_the_first():
    import torch

    from dist_lc.confusion import scored_argmax

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (3, 10, 5, 7), generator=gen).float()   # few values: many ties
    scores[:, :2] = 9   # unscored classes never win
    expected = np.argmax(scores[:, 2:].numpy(), axis=1)   # numpy's argmax: the first maximum
    assert torch.equal(scored_argmax(scores), torch.from_numpy(expected))
    assert torch.equal(scored_argmax(scores.bfloat16()), torch.from_numpy(expected))
    scores[0, 5, 0, 0], scores[0, 7, 0, 0], scores[1, 2:, 0, 0] = float("nan"), float("nan"), float("nan")
    assert torch.equal(scored_argmax(scores), scores[:, 2:].argmax(dim=1))   # the first NaN wins, as in argmax
    assert scored_argmax(scores)[0, 0, 0] == 3 and scored_argmax(scores)[1, 0, 0] == 0


def test_the_confusion_matrix_counts_scored_pixels_by_true_and_predicted_class():
    import torch

    from dist_lc.confusion import confusion

    gen = torch.Generator().manual_seed(1)
    mask = torch.randint(0, 10, (2, 6, 5), generator=gen, dtype=torch.uint8)
    scores = torch.randn(2, 10, 6, 5, generator=gen)
    truth, pred = mask.numpy().ravel().astype(int), scores[:, 2:].argmax(dim=1).numpy().ravel()
    expected = np.zeros((8, 8), np.int64)
    for t, p in zip(truth, pred):
        if t >= 2:
            expected[t - 2, p] += 1
    assert np.array_equal(confusion(mask, scores).numpy(), expected)
    with pytest.raises(ValueError, match="masks of shape"):
        confusion(mask[:, None], scores)
