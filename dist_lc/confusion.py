"""The confusion matrix of a batch, counted where its scores are (on a GPU, without waiting for it).

Rows are the true class, columns the most probable scored class, over the pixels whose true class is
scored (2..9: no_data and clouds have no score); :mod:`dist_lc.pixel_metrics` turns the matrix, summed
over batches and ranks, into pixel accuracy and IoUs. Kept apart from those so that what only reads
matrices (the CV report) does not import torch.
"""
from __future__ import annotations

import torch

from .metrics import SCORED_CLASSES
from .pixel_metrics import N

SCORED = torch.tensor(SCORED_CLASSES)
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
