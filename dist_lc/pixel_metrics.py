"""Pixel metrics of a segmentation: a confusion matrix over the scored classes, pixel accuracy,
per-class IoU and mIoU. The KL score of the tile proportions remains the one that selects models;
these say whether the pixels are in the right places.

The matrix counts pixels whose true class is scored (2..9: no_data and clouds have no score), with
the prediction the most probable scored class; it is counted on the device (:mod:`dist_lc.confusion`)
and summed over ranks. mIoU averages the classes present in the truth or in the prediction (a class
absent from both has no IoU).
"""
from __future__ import annotations

import numpy as np

from .metrics import SCORED_CLASSES, SCORED_NAMES

N = len(SCORED_CLASSES)   # the matrix is N × N


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
