"""Does a cross-validation score say what a held-out region will score? Tile-by-tile folds against
folds of blocks of consecutive ids (``lc-shard pack --block-size``), on the official labels alone.

    python benchmarks/spatial_folds.py [--labels CSV] [--blocks 1 100 500 2000] [--holdouts 4]
    python benchmarks/spatial_folds.py --quick          # the test suite's smoke run

The challenge numbers tiles row by row over each region: neighbouring ids, and ids about a row (44
to 45) apart, are neighbouring places with alike labels; its 5,043 test tiles are the two long runs
of ids missing from train_labels.csv (10,087–13,448 and 16,811–18,491), held-out regions. Here
ranges of 3,362 consecutive ids (the first run's length), each at least 97 % labelled, play the test. For each, the rest
is split into 5 folds by ``assign_folds`` (the pack's own), tile by tile or by blocks, and two
predictors that read no pixel are scored (the challenge's KL) by 5-fold CV and on the held-out range:

- ``mean``: the training tiles' mean proportions (the challenge's baseline);
- ``neighbours``: 0.8 × the mean of the training tiles among the 6 nearest ids within 50, + 0.2 ×
  ``mean`` (the mean alone without such a neighbour): a model that knows its region's labels.

A CV that tells the truth scores each as the held-out ranges do, and ranks them as they do. The last
column is the price of blocks: folds less alike in their classes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SAMPLE_SRC, machine_line, table  # noqa: E402

FOLDS, SEED, REACH, NEIGHBOURS, TRUST = 5, 0, 50, 6, 0.8


def predict(train_ids, train_props, ids) -> dict[str, np.ndarray]:
    """Both predictors' proportions for ``ids`` from the labelled ``train_ids``."""
    mean = train_props.mean(axis=0)
    order = np.argsort(train_ids)
    sorted_ids, sorted_props = train_ids[order], train_props[order]
    near = np.tile(mean, (len(ids), 1))
    at = np.searchsorted(sorted_ids, ids)
    for n, (i, a) in enumerate(zip(ids, at)):
        lo, hi = max(a - NEIGHBOURS, 0), min(a + NEIGHBOURS, len(sorted_ids))
        d = np.abs(sorted_ids[lo:hi] - i)
        pick = np.argsort(d, kind="stable")[:NEIGHBOURS]
        pick = pick[d[pick] <= REACH]
        if len(pick):
            near[n] = TRUST * sorted_props[lo:hi][pick].mean(axis=0) + (1 - TRUST) * mean
    return {"mean": np.tile(mean, (len(ids), 1)), "neighbours": near}


def scores(train_ids, train_props, ids, props) -> dict[str, float]:
    from dist_lc.metrics import kl_score

    return {name: kl_score(props, p) for name, p in predict(train_ids, train_props, ids).items()}


def cv_scores(ids, props, block: int) -> dict[str, float]:
    """Mean over 5 folds of each predictor's KL on a fold, fitted on the other four; and the largest
    KL of a fold's mean proportions from all tiles' (``lc-shard describe``'s balance of the folds)."""
    from shard_tools.describe import kl_divergence
    from shard_tools.folds import assign_folds

    fold = assign_folds(props, FOLDS, SEED, np.arange(len(ids)) // block)   # ids sorted: consecutive ids
    per_fold = [scores(ids[fold != k], props[fold != k], ids[fold == k], props[fold == k]) for k in range(FOLDS)]
    out = {name: float(np.mean([s[name] for s in per_fold])) for name in per_fold[0]}
    out["balance"] = max(kl_divergence(props.mean(0), props[fold == k].mean(0)) for k in range(FOLDS))
    return out


def id_structure(ids, props) -> str:
    """Mean L1 between the class proportions of tiles 1, 44, 45 ids apart and of random pairs, and the
    two longest runs of missing ids (where the test tiles are)."""
    full = np.full((int(ids.max()) + 1, props.shape[1]), np.nan)
    full[ids] = props

    def at(lag):
        a, b = full[lag:], full[:-lag]
        ok = ~np.isnan(a[:, 0]) & ~np.isnan(b[:, 0])
        return np.abs(a[ok] - b[ok]).sum(1).mean()

    shuffled = props[np.random.default_rng(SEED).permutation(len(props))]
    gaps = np.diff(ids)
    runs = sorted(((int(ids[k]) + 1, int(ids[k + 1]) - 1) for k in np.argsort(gaps)[-2:]))
    return (f"L1 between the proportions of tiles 1 / 44 / 45 ids apart: {at(1):.3f} / {at(44):.3f} / "
            f"{at(45):.3f}; of random pairs: {np.abs(props - shuffled).sum(1).mean():.3f}. Longest runs of "
            f"missing ids: {', '.join(f'{a}–{b} ({b - a + 1})' for a, b in runs)}")


def random_balance(props) -> float:
    """The largest KL of a fold's mean proportions from all tiles' for a random tile-by-tile split."""
    from shard_tools.describe import kl_divergence

    fold = np.random.default_rng(SEED).permutation(len(props)) % FOLDS
    return max(kl_divergence(props.mean(0), props[fold == k].mean(0)) for k in range(FOLDS))


def holdout_ranges(ids: np.ndarray, count: int, span: int) -> list[tuple[int, int]]:
    """``count`` ranges of ``span`` consecutive ids, spread over the labelled ids, apart, each at
    least 97 % labelled (a range may touch a test run by an id or so)."""
    present = set(ids.tolist())
    starts, out = np.linspace(ids.min(), ids.max() - span, 4 * count).astype(int), []
    for s in starts:
        if sum(i in present for i in range(s, s + span)) > 0.97 * span and all(s >= b + span for b, _ in out):
            out.append((int(s), int(s + span - 1)))
    return out[:: max(len(out) // count, 1)][:count]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=Path, default=SAMPLE_SRC / "train_labels.csv",
                    help="the official train_labels.csv (default: the one beside the sample)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 100, 500, 2000], help="ids per block (1: tile by tile)")
    ap.add_argument("--holdouts", type=int, default=4)
    ap.add_argument("--span", type=int, default=3362, help="ids in a held-out range")
    ap.add_argument("--quick", action="store_true", help="2 block sizes, 1 held-out range of 500 (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.blocks, args.holdouts, args.span = [1, 100], 1, 500
    labels = pd.read_csv(args.labels).set_index("sample_id").sort_index()
    ids = labels.index.to_numpy(np.int64)
    props = labels.to_numpy(np.float64)
    props = props / props.sum(axis=1, keepdims=True)
    ranges = holdout_ranges(ids, args.holdouts, args.span)
    truth, cv = [], {b: [] for b in args.blocks}
    for lo, hi in ranges:
        held = (ids >= lo) & (ids <= hi)
        truth.append(scores(ids[~held], props[~held], ids[held], props[held]))
        for b in args.blocks:
            cv[b].append(cv_scores(ids[~held], props[~held], b))
        cv["random"] = cv.get("random", []) + [{"balance": random_balance(props[~held])}]

    def mean(runs, name):
        return float(np.mean([r[name] for r in runs]))

    held_row = [mean(truth, "mean"), mean(truth, "neighbours")]
    rows = [["held-out ranges (the truth)", *(f"{x:.4f}" for x in held_row), f"{held_row[1] / held_row[0]:.2f}", "–"]]
    for b in args.blocks:
        row = [mean(cv[b], "mean"), mean(cv[b], "neighbours")]
        rows.append([f"5-fold CV, {'tile by tile' if b == 1 else f'blocks of {b} tiles'}", *(f"{x:.4f}" for x in row),
                     f"{row[1] / row[0]:.2f}", f"{mean(cv[b], 'balance'):.1e}"])
    print(f"Machine: {machine_line()}; {args.labels} ({len(ids)} tiles); held out: "
          f"{', '.join(f'{lo}–{hi}' for lo, hi in ranges)}\n")
    print(id_structure(ids, props) + "\n")
    print(table(["score of", "KL, mean", "KL, neighbours", "neighbours / mean", "largest fold KL from all"], rows))
    print(f"\nLargest fold KL from all of a random tile-by-tile split of the same tiles: {mean(cv['random'], 'balance'):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
