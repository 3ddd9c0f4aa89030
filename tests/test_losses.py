"""Class weights and the per-tile segmentation loss."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_lc.losses import SegmentationLoss, class_weights, proportion_kl
from dist_lc.metrics import kl_per_sample

FULL_COUNTS = [0, 20643, 60971025, 404760981, 277012377, 96473046, 333407133, 9775295, 1071, 29404605]


# ---------------------------------------------------------------- class weights

def test_inverse_frequency_on_full_training_counts():
    w = class_weights(FULL_COUNTS, "inverse_frequency")
    assert w.shape == (10,) and w.dtype == torch.float32
    assert w[0] == 0 and w[1] == 0
    total = sum(FULL_COUNTS[2:])
    expected = [total / (8 * FULL_COUNTS[c]) for c in range(2, 10)]
    np.testing.assert_allclose(w[2:].numpy(), expected, rtol=1e-6)
    assert w.argmax() == 8  # snow, 1,071 pixels, dominates


def test_empty_class_gets_zero_weight_not_inf():
    counts = list(FULL_COUNTS)
    counts[8] = 0
    for scheme in ("inverse_frequency", "sqrt_inverse_frequency"):
        w = class_weights(counts, scheme)
        assert torch.isfinite(w).all() and w[8] == 0 and (w[[2, 3, 4, 5, 6, 7, 9]] > 0).all()


def test_none_scheme_ignores_no_data_and_clouds():
    assert class_weights(FULL_COUNTS, "none").tolist() == [0, 0] + [1] * 8


def test_sqrt_inverse_frequency_is_milder_and_mean_one():
    counts = list(FULL_COUNTS)
    counts[7] = 0
    w = class_weights(counts, "sqrt_inverse_frequency").double()
    inv = class_weights(counts, "inverse_frequency").double()
    present = inv > 0
    assert w[present].mean().item() == pytest.approx(1.0)
    ratio = w[present] / inv[present].sqrt()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert w[:2].tolist() == [0, 0] and w[7] == 0


def test_class_weights_reject_bad_input():
    with pytest.raises(ValueError, match="class weights: 'balanced' is not one of none, "):
        class_weights(FULL_COUNTS, "balanced")
    with pytest.raises(ValueError):
        class_weights(FULL_COUNTS[:8], "none")
    with pytest.raises(ValueError):
        class_weights([5, 5] + [0] * 8, "inverse_frequency")


# ---------------------------------------------------------------- loss

def reference_loss(logits, mask, props, weights, kl_weight):
    """Plain-Python per-tile loss for one tile: logits[c][i][j], mask[i][j], props[c]."""
    classes, rows, cols = len(logits), len(mask), len(mask[0])
    ce, mean_prob = 0.0, [0.0] * classes
    for i in range(rows):
        for j in range(cols):
            z = [logits[c][i][j] for c in range(classes)]
            lse = math.log(sum(math.exp(v) for v in z))
            ce += weights[mask[i][j]] * (lse - z[mask[i][j]])
            for c in range(classes):
                mean_prob[c] += math.exp(z[c] - lse) / (rows * cols)
    loss = ce / (rows * cols)
    if kl_weight:
        p = mean_prob[2:]
        t = props[2:]
        p = [v / sum(p) + 1e-7 for v in p]
        t = [v / sum(t) + 1e-7 for v in t]
        loss += kl_weight * sum(a * math.log(a / b) for a, b in zip(t, p))
    return loss


def random_batch(n=4, size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, size, size, generator=g) * 2
    mask = torch.randint(0, 10, (n, size, size), generator=g)
    props = torch.stack([torch.bincount(m.flatten(), minlength=10) for m in mask]).float() / size**2
    return logits, mask, props


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_per_tile_loss_matches_hand_computed_reference(kl_weight):
    logits, mask, props = random_batch(n=2, size=3)
    weights = torch.tensor([0.0, 0.0, 1.5, 0.5, 1.0, 2.0, 0.25, 3.0, 1.0, 0.75])
    loss = SegmentationLoss(weights, kl_weight=kl_weight)(logits, mask, props)
    assert loss.shape == (2,) and loss.dtype == torch.float32
    for k in range(2):
        ref = reference_loss(logits[k].tolist(), mask[k].tolist(), props[k].tolist(), weights.tolist(), kl_weight)
        assert loss[k].item() == pytest.approx(ref, rel=1e-5)


def test_ignored_pixels_count_in_the_denominator():
    # Keras SUM_OVER_BATCH_SIZE: divide by the pixel count, not by the sum of weights.
    logits = torch.zeros(1, 10, 2, 2)
    mask = torch.tensor([[[0, 1], [1, 3]]])  # one scored pixel out of four
    loss = SegmentationLoss(class_weights(FULL_COUNTS, "none"))(logits, mask, torch.zeros(1, 10))
    assert loss.item() == pytest.approx(math.log(10) / 4)


def test_loss_is_invariant_to_splitting_the_batch():
    logits, mask, props = random_batch(n=6, size=8, seed=3)
    mask[0, :4] = 0  # tiles with different amounts of ignored pixels
    mask[3] = 1
    loss_fn = SegmentationLoss(class_weights(FULL_COUNTS, "inverse_frequency"), kl_weight=0.3)
    whole = loss_fn(logits, mask, props).sum() / 6
    parts = sum(loss_fn(logits[s], mask[s], props[s]).sum() for s in (slice(0, 1), slice(1, 4), slice(4, 6))) / 6
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    # whereas PyTorch's weighted mean is not (each part has its own weight total)
    w = loss_fn.class_weights
    torch_whole = F.cross_entropy(logits, mask, weight=w)
    torch_parts = (F.cross_entropy(logits[:3], mask[:3], weight=w) + F.cross_entropy(logits[3:], mask[3:], weight=w)) / 2
    assert abs(torch_parts.item() - torch_whole.item()) > 1e-3


def test_gradient_is_finite_even_for_extreme_logits_and_empty_tiles():
    logits, mask, props = random_batch(n=3, size=4, seed=5)
    logits[0] *= 200
    mask[2] = 1
    props[2] = torch.tensor([0.0, 1.0] + [0.0] * 8)  # all clouds: no scored class
    logits.requires_grad_(True)
    loss = SegmentationLoss(class_weights(FULL_COUNTS, "inverse_frequency"), kl_weight=1.0)(logits, mask, props)
    assert loss[2].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0


def test_kl_term_is_zero_when_mean_softmax_equals_true_props():
    props = torch.tensor([[0.1, 0.05, 0.2, 0.3, 0.0, 0.15, 0.1, 0.05, 0.0, 0.05]])
    logits = torch.log(props.clamp_min(1e-30)).view(1, 10, 1, 1).expand(1, 10, 4, 4).contiguous()
    kl = proportion_kl(F.log_softmax(logits, dim=1), props)
    assert abs(kl.item()) < 1e-6
    other = proportion_kl(F.log_softmax(torch.zeros(1, 10, 4, 4), dim=1), props)
    assert other.item() > 0.1


def test_kl_term_equals_the_challenge_score_of_the_mean_softmax():
    logits, mask, props = random_batch(n=5, size=6, seed=7)
    log_probs = F.log_softmax(logits, dim=1)
    kl = proportion_kl(log_probs, props).double().numpy()
    expected = kl_per_sample(props.double().numpy(), log_probs.exp().mean(dim=(2, 3)).double().numpy())
    np.testing.assert_allclose(kl, expected, rtol=1e-4, atol=1e-6)


def test_loss_under_bf16_autocast_is_float32_and_close():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 10, 1)
    x = torch.rand(2, 4, 8, 8)
    _, mask, props = random_batch(n=2, size=8, seed=9)
    loss_fn = SegmentationLoss(class_weights(FULL_COUNTS, "sqrt_inverse_frequency"), kl_weight=0.5)
    ref = loss_fn(conv(x), mask, props)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits, mask, props)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=1e-2)
    loss.sum().backward()
    assert torch.isfinite(conv.weight.grad).all()


def test_weights_are_a_buffer_kept_out_of_the_state_dict():
    loss_fn = SegmentationLoss(class_weights(FULL_COUNTS, "none"))
    assert "class_weights" in dict(loss_fn.named_buffers())
    assert loss_fn.state_dict() == {}
    with pytest.raises(ValueError):
        SegmentationLoss(torch.ones(8))
