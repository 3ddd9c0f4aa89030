"""Pixel metrics of a segmentation: a confusion matrix over the scored classes, pixel accuracy,
per-class IoU and mIoU. The KL score of the tile proportions remains the one that selects models;
these say whether the pixels are in the right places.

The matrix counts pixels whose true class is scored (2..9: no_data and clouds have no score), with
the prediction the most probable scored class; it is accumulated on the device with a bincount and
summed over ranks. mIoU averages the classes present in the truth or in the prediction (a class
absent from both has no IoU).
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import SCORED_CLASSES, SCORED_NAMES

SCORED = torch.tensor(SCORED_CLASSES)
N = len(SCORED_CLASSES)
assert SCORED_CLASSES == tuple(range(SCORED_CLASSES[0], SCORED_CLASSES[0] + N)), "scored classes not contiguous"


def scored_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Index 0..7 of the most probable scored class per pixel, from (B, 10, H, W) logits or probabilities
    (the first such class on a tie, and the first NaN before any number, as ``argmax``)."""
    scored = scores[:, SCORED_CLASSES[0]:SCORED_CLASSES[-1] + 1]   # a view: the scored classes are 2..9
    if scores.device.type != "cpu":
        return scored.argmax(dim=1)
    # On the CPU, argmax across channels walks memory with a stride of H·W per step; comparing whole
    # channel planes instead is several times faster (docs/BENCHMARKS.md).
    best, index = scored[:, 0], torch.zeros(scored[:, 0].shape, dtype=torch.long)
    for c in range(1, N):
        x = scored[:, c]
        better = (x > best) | (x.isnan() & ~best.isnan())   # a NaN wins, as in argmax (a diverged model)
        best = torch.maximum(best, x)   # NaN once NaN: no later channel beats it
        index.masked_fill_(better, c)
    return index


def confusion(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(8, 8) int64 counts, rows = true class, columns = predicted class, over the scored pixels,
    from (B, H, W) masks and (B, 10, H, W) scores."""
    if mask.shape != scores.shape[:1] + scores.shape[2:]:
        raise ValueError(f"confusion: masks of shape {tuple(mask.shape)} for scores of shape {tuple(scores.shape)}")
    truth = mask.long() - SCORED_CLASSES[0]
    keep = (truth >= 0) & (truth < N)
    # Unscored pixels go to an extra bin, dropped; counted by index_add_ rather than a boolean index
    # and bincount, which on a GPU both wait for it to send a count or a maximum back to the host.
    pairs = torch.where(keep, truth * N + scored_argmax(scores), N * N).flatten()
    counts = torch.zeros(N * N + 1, dtype=torch.long, device=pairs.device)
    counts.index_add_(0, pairs, torch.ones_like(pairs))
    return counts[:N * N].reshape(N, N)


def summary(matrix) -> dict:
    """Pixel accuracy, mIoU and each scored class's IoU (None where a class is absent from both)."""
    m = np.asarray(matrix, dtype=np.float64)
    total = m.sum()
    tp, truth, pred = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    union = truth + pred - tp
    iou = {name: (float(tp[i] / union[i]) if union[i] > 0 else None) for i, name in enumerate(SCORED_NAMES)}
    present = [v for v in iou.values() if v is not None]
    return {"pixel_acc": float(tp.sum() / total) if total else None,
            "miou": float(np.mean(present)) if present else None,
            **{f"iou_{name}": value for name, value in iou.items()}}


COLUMNS = ("pixel_acc", "miou", *(f"iou_{name}" for name in SCORED_NAMES))
