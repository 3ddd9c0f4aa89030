"""The eight flips and rotations of a square tile (the dihedral group), written once: training draws
them as augmentation, test-time augmentation averages over them, maps turn probabilities back.

A view is ``(k, flip)``: ``k`` quarter turns, then a left-right flip if ``flip``. Its code
``2k + flip`` numbers the eight views 0..7 in the order of :data:`VIEWS`. The functions take numpy
arrays or torch tensors alike and return views of them where the library can (no copy).
"""
from __future__ import annotations

import numpy as np
import torch

VIEWS = [(k, flip) for k in range(4) for flip in (False, True)]


def of_code(code: int) -> tuple[int, bool]:
    return code >> 1, bool(code & 1)


def turn(x, k: int, flip: bool, axes=(0, 1)):
    """``x`` turned by ``k`` quarter turns in the plane of ``axes``, then flipped along ``axes[1]``."""
    if isinstance(x, torch.Tensor):
        x = torch.rot90(x, k, dims=axes)
        return x.flip(axes[1]) if flip else x
    x = np.rot90(x, k, axes=axes)
    return np.flip(x, axes[1]) if flip else x


def unturn(x, k: int, flip: bool, axes=(0, 1)):
    """The inverse of :func:`turn`: a view turned back."""
    if isinstance(x, torch.Tensor):
        x = x.flip(axes[1]) if flip else x
        return torch.rot90(x, -k, dims=axes)
    x = np.flip(x, axes[1]) if flip else x
    return np.rot90(x, -k, axes=axes)
