"""Fold assignment: deterministic for a seed, balanced in size, stratified on class proportions.

The method is a greedy "largest deficit" stratification for continuous labels (the proportion
vectors), in the spirit of iterative stratification (Sechidis et al., 2011):

1. Fold sizes are fixed first: ``n // k`` each, one more for ``n % k`` folds drawn with the seed,
   so sizes differ by at most one.
2. Every fold has a target class mass: its size times the global mean proportion vector.
3. Tiles are visited by rarity decile, rarest decile first (rarity: sum over classes of proportion /
   global mean, so a tile with snow or water outranks a plain cultivated one), in seeded random
   order inside a decile. Strict rarest-first order gave the same partition for every seed; deciles
   keep the stratification and make the seed matter.
4. Each tile goes to the fold, among those not yet full, whose class mass is furthest *below*
   target in this tile's classes (smallest ``p · W (mass - target)`` with ``W = 1 / global mean``);
   ties go to the lower position in a seeded fold order.

Ties are common (identical tiles, e.g. all one class, and folds that hold the same tiles), so they
must be exact: the dot products are summed in one fixed order (BLAS kernels differ from one CPU to
another, and from one row to the next) and the needs compared at 12 significant digits, so that
the last bits of a mass summed in another order do not decide. The same seed then gives the same
folds on every machine.

``groups`` makes the items whole blocks of tiles (``lc-shard pack --block-size``); balance and
truthfulness of tile-by-tile and block folds: docs/BENCHMARKS.md ("Folds that hold out regions").
"""
from __future__ import annotations

import numpy as np

WEIGHT_FLOOR = 1e-6  # a class with (almost) no pixels must not get an infinite weight
RARITY_STRATA = 10  # visit order: rarity deciles
TIE_DIGITS = 12     # needs that agree to this many significant digits are a tie


def fold_sizes(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n // k`` per fold, plus one for ``n % k`` folds chosen with ``rng``."""
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[rng.permutation(k)[: n % k]] += 1
    return sizes


def rarity_weights(props: np.ndarray) -> np.ndarray:
    """1 / global mean proportion per class (floored), so rare classes count as much as common ones."""
    return 1.0 / np.maximum(props.mean(axis=0), WEIGHT_FLOOR)


def dot_rows(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``rows @ vector`` summed in the same order for every row (no BLAS): equal rows, equal results."""
    return (rows * vector).sum(axis=1)


def quantised(need: np.ndarray) -> np.ndarray:
    """``need`` rounded to ``TIE_DIGITS`` significant digits of its largest magnitude."""
    scale = float(np.abs(need).max()) * 10.0 ** -TIE_DIGITS
    return np.round(need / scale) if scale > 0 else need


def visit_order(props: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tile indices by rarity decile, rarest first; seeded random order inside each decile."""
    rarity_rank = np.empty(len(props), dtype=np.int64)
    rarity_rank[np.argsort(-dot_rows(props, weights), kind="stable")] = np.arange(len(props))
    stratum = rarity_rank * RARITY_STRATA // len(props)
    return np.lexsort((rng.permutation(len(props)), stratum))


def assign_folds(props, k: int, seed: int = 0, groups=None) -> np.ndarray:
    """Fold index (0..k-1) of each row of ``props`` (n × classes). Deterministic for ``seed``.

    ``groups`` (one label per row): rows of a group go to one fold together, the group weighing as
    its tiles (spatial blocks: neighbouring tiles look alike, so a tile's neighbour in the training
    folds tells the model its label). A group goes only to a fold it fills no more than half a group
    past its size (to the least filled when none is left), and the last groups go to folds still
    empty: sizes differ by about a group (more with under 4 groups a fold)."""
    props = np.asarray(props, dtype=np.float64)
    n = len(props)
    if k < 1:
        raise ValueError(f"need at least one fold, got {k}")
    labels, rows = np.unique(np.arange(n) if groups is None else np.asarray(groups), return_inverse=True)
    if len(labels) < k:
        raise ValueError(f"cannot split {len(labels)} {'tiles' if groups is None else 'blocks'} into {k} folds")
    counts = np.bincount(rows, minlength=len(labels))
    items = np.zeros((len(labels), props.shape[1]))
    np.add.at(items, rows, props)
    items /= counts[:, None]   # a group's mean proportions (a tile's own when groups is None)
    rng = np.random.default_rng(seed)
    sizes = fold_sizes(n, k, rng)
    weights = rarity_weights(props)
    target = sizes[:, None] * props.mean(axis=0)[None, :]
    mass = np.zeros_like(target)
    filled = np.zeros(k, dtype=np.int64)
    fold_rank = rng.permutation(k)  # seeded tie-break between equally needy folds
    fold_of_item = np.empty(len(labels), dtype=np.int64)
    for placed, i in enumerate(visit_order(items, weights, rng)):
        need = quantised(dot_rows(mass - target, weights * items[i]))
        full = 2 * filled + counts[i] > 2 * sizes   # a group would overshoot by more than half of it
        need[full if not full.all() else filled > filled.min()] = np.inf
        empty = filled == 0
        if len(labels) - placed <= empty.sum():   # as many items left as empty folds: one each
            need[~empty] = np.inf
        best = np.lexsort((fold_rank, need))[0]
        fold_of_item[i] = best
        mass[best] += counts[i] * items[i]
        filled[best] += counts[i]
    return fold_of_item[rows]
