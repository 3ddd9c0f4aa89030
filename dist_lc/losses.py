"""Class weights and the per-tile segmentation loss (weighted cross-entropy + optional proportion KL)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lc_common.tiles import NUM_CLASSES

from .config import LossConfig, dispatch_table, pick
from .metrics import EPSILON, SCORED_CLASSES


def _inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """w_c = total / (8 * count_c) over the scored classes; 0 for ignored and empty classes."""
    scored = list(SCORED_CLASSES)
    total = counts[scored].sum()
    if total <= 0:
        raise ValueError("pixel_counts: no pixel in any scored class")
    w = np.zeros(NUM_CLASSES)
    present = [c for c in scored if counts[c] > 0]
    w[present] = total / (len(scored) * counts[present])
    return w


def _sqrt_inverse_frequency(counts: np.ndarray) -> np.ndarray:
    """The square root of the inverse frequency, rescaled to mean 1 over the classes that have pixels."""
    w = np.sqrt(_inverse_frequency(counts))
    return w / w[w > 0].mean()


def _uniform(counts: np.ndarray) -> np.ndarray:
    """1 for every scored class, whatever the counts."""
    w = np.zeros(NUM_CLASSES)
    w[list(SCORED_CLASSES)] = 1.0
    return w


WEIGHT_SCHEMES = dispatch_table(LossConfig, "class_weights", {
    "none": _uniform,
    "inverse_frequency": _inverse_frequency,
    "sqrt_inverse_frequency": _sqrt_inverse_frequency,
})


def class_weights(pixel_counts, scheme: str) -> torch.Tensor:
    """Per-class loss weights, float32 (10,); no_data and clouds always get 0.

    - ``"none"``: 1 for every scored class.
    - ``"inverse_frequency"``: ``total / (8 * count_c)`` with ``total`` the pixels of the 8 scored
      classes (the benchmark's intent, sklearn's "balanced"); a class without pixels gets 0.
    - ``"sqrt_inverse_frequency"``: the square root of the above, rescaled to mean 1 over the
      classes that have pixels (a milder rebalancing).
    """
    counts = np.asarray(pixel_counts, dtype=np.float64).reshape(-1)
    if counts.shape != (NUM_CLASSES,) or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"pixel_counts must be {NUM_CLASSES} non-negative numbers, got {pixel_counts!r}")
    weigh = pick(WEIGHT_SCHEMES, scheme, "class weights")
    return torch.tensor(weigh(counts), dtype=torch.float32)


class SegmentationLoss(nn.Module):
    """Per-tile loss: class-weighted pixel cross-entropy, plus ``kl_weight`` × the tile's proportion KL.

    ``forward(logits N×10×H×W, mask N×H×W int, props N×10) -> (N,) float32``, one value per tile:

    - ``ce_tile = sum over pixels of w[mask] * CE(pixel) / (H*W)``. The division is by the pixel
      count, **not** by the sum of the weights (Keras' SUM_OVER_BATCH_SIZE convention, which the
      benchmark used). Each tile's value is therefore independent of the other tiles in its batch,
      and the trainer's ``sum over tiles / effective batch size`` is exactly the same number whatever
      the micro-batch, accumulation and DDP split (``cross_entropy(weight=w, reduction='mean')``
      divides by each micro-batch's own weight total and is not).
    - ``kl_tile = KL(y || yhat)`` where ``y`` is the true proportions of the 8 scored classes
      renormalised + 1e-7 and ``yhat`` the tile's mean pixel softmax over the same classes,
      renormalised + 1e-7: the challenge's per-tile score, differentiable. A tile whose true
      scored proportions sum to 0 contributes 0. Skipped entirely when ``kl_weight == 0``.

    Logits of any dtype (bf16/fp16 under autocast) are computed on in float32.
    """

    def __init__(self, class_weights: torch.Tensor, kl_weight: float = 0.0):
        super().__init__()
        weights = torch.as_tensor(class_weights, dtype=torch.float32)
        if weights.shape != (NUM_CLASSES,):
            raise ValueError(f"class_weights must have shape ({NUM_CLASSES},), got {tuple(weights.shape)}")
        self.register_buffer("class_weights", weights, persistent=False)
        self.kl_weight = float(kl_weight)

    def forward(self, logits: torch.Tensor, mask: torch.Tensor, props: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        pixels = mask.shape[-2] * mask.shape[-1]
        ce = F.nll_loss(log_probs, mask.long(), weight=self.class_weights, reduction="none")
        loss = ce.sum(dim=(1, 2)) / pixels
        if self.kl_weight:
            loss = loss + self.kl_weight * proportion_kl(log_probs, props)
        return loss


def proportion_kl(log_probs: torch.Tensor, props: torch.Tensor) -> torch.Tensor:
    """Per-tile challenge KL between true proportions (N×10) and the mean pixel softmax (from N×10×H×W log-probs)."""
    scored = list(SCORED_CLASSES)
    pred = log_probs.exp().mean(dim=(2, 3))[:, scored]
    pred = pred / pred.sum(dim=1, keepdim=True) + EPSILON
    true = props.to(device=pred.device, dtype=torch.float32)[:, scored]
    total = true.sum(dim=1, keepdim=True)
    true = true / total.clamp_min(torch.finfo(torch.float32).tiny) + EPSILON
    kl = (true * (true.log() - pred.log())).sum(dim=1)
    return torch.where(total.squeeze(1) > 0, kl, torch.zeros_like(kl))
