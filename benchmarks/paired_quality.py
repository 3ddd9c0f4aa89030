"""Two prediction sets of ``benchmarks/quality.py`` runs compared tile by tile, with the noise of a fold.

    python benchmarks/paired_quality.py --work /tmp/dq \\
        --a benchmarks/results/quality-curve-2026-12-01.json "dist-lc cv recommended.yaml (3 min/fold) / plain" \\
        --b benchmarks/results/quality-refit-2026-12-01.json "dist-lc cv recommended.yaml (3 min/fold) / plain"

Prints each set's out-of-fold KL, the mean of the per-tile differences B − A ± the standard
deviation of a bootstrap over those differences (paired: the tiles' own difficulty cancels), and
each fold's score ± the bootstrap standard deviation of that fold's tiles alone (the noise of one
fold's score). Keys are those of the JSON's "predictions" (``quality.py`` prints them as rows).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pixel_gbm  # noqa: E402
from common import SAMPLE_SRC, ensure_shards  # noqa: E402
from quality import BOOTSTRAP, CLASSES, per_tile  # noqa: E402


def predictions(path: Path, key: str) -> pd.DataFrame:
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    saved = json.loads(path.read_text()).get("predictions", {})
    if key not in saved:
        raise SystemExit(f"{path}: no predictions {key!r} (it has: {', '.join(sorted(saved))})")
    frame = pd.DataFrame.from_dict(saved[key], orient="index")[CLASSES]
    frame.index = frame.index.astype(str)
    return frame


def bootstrap_std(values: np.ndarray, rng: np.random.Generator) -> float:
    return float(values[rng.integers(0, len(values), (BOOTSTRAP, len(values)))].mean(axis=1).std())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="where the sample's shards are (packed if missing)")
    ap.add_argument("--src", type=Path, default=SAMPLE_SRC)
    ap.add_argument("--a", nargs=2, required=True, metavar=("JSON", "KEY"))
    ap.add_argument("--b", nargs=2, required=True, metavar=("JSON", "KEY"))
    ap.add_argument("--block-size", default="auto", help="lc-shard pack --block-size of the runs' pack")
    args = ap.parse_args(argv)
    tiles = pixel_gbm.load_tiles(ensure_shards(args.work / "shards", args.src, args.block_size))
    truth = pd.DataFrame(tiles.props, index=np.asarray(tiles.keys).astype(str), columns=CLASSES)
    folds = pd.Series(tiles.folds, index=truth.index)
    scores = {}
    for name, (path, key) in (("A", args.a), ("B", args.b)):
        pred = predictions(Path(path), key)
        ids = truth.index.intersection(pred.index)
        scores[name] = pd.Series(per_tile(truth.loc[ids].to_numpy(), pred.loc[ids].to_numpy()), index=ids).dropna()
    ids = scores["A"].index.intersection(scores["B"].index)
    rng = np.random.default_rng(0)
    diff = (scores["B"][ids] - scores["A"][ids]).to_numpy()
    print(f"A: {args.a[1]} ({Path(args.a[0]).name})\nB: {args.b[1]} ({Path(args.b[0]).name})")
    print(f"{len(ids)} tiles: A {scores['A'][ids].mean():.4f}, B {scores['B'][ids].mean():.4f}, "
          f"B - A {diff.mean():+.4f} ± {bootstrap_std(diff, rng):.4f} (paired bootstrap)")
    for name in ("A", "B"):
        per_fold = [f"fold {k}: {v.mean():.4f} ± {bootstrap_std(v.to_numpy(), rng):.4f} ({len(v)} tiles)"
                    for k, v in scores[name][ids].groupby(folds[ids])]
        print(f"{name} per fold: " + "; ".join(per_fold))
    return 0


if __name__ == "__main__":
    sys.exit(main())
