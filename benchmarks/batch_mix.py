"""How mixed the training batches are at the challenge's full size: each fold packed in a seeded random
order (``lc-shard pack`` now) against in id order, with folds of blocks of ids (now) and tile by tile (the
pack before), in the trainer's own sample order.

    python benchmarks/batch_mix.py [--labels CSV] [--micro 16] [--layouts 1x2 8x8] [--epochs 2]
    python benchmarks/batch_mix.py --quick          # the test suite's smoke run

Neighbouring challenge ids are neighbouring places with alike labels. No pixel is read: the official
``train_labels.csv`` (every train tile's class proportions) is put through the pack's fold assignment,
tile order and shard cut (default 100 MB shards), then through the training stream's own epoch plan,
rank and worker ranges and shuffle buffer (``ShardStream.samples``), each shard's samples being its
tiles' rows. Per batch: the mean L1 distance between the class proportions of two of its tiles and
the median id distance between them, against random batches of the same tiles (a perfect shuffle).
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SAMPLE_SRC, machine_line, table  # noqa: E402

FOLDS, SEED, SHUFFLE_BUFFER, VALIDATION_FOLD = 5, 0, 64, 0
PACKS = (   # name, tiles in id order within a fold, --block-size
    ("now: blocks of ids, each fold in a seeded order", False, "auto"),
    ("blocks of ids, each fold in id order", True, "auto"),
    ("before: tile by tile, each fold in id order", True, "1"),
)


def id_order(train, fold_of, seed):
    """The tile order of the pack before: by fold, then by id."""
    return sorted(((t, "train", int(f)) for t, f in zip(train, fold_of)), key=lambda x: x[2])


def planned_shards(labels: pd.DataFrame, in_id_order: bool, block: str) -> tuple[list[tuple[str, int]], dict]:
    """(name, count) of each training shard of folds other than the validation one, in manifest
    order, and each shard's (ids, proportions); ``labels`` in id order, folds of ``block``
    (``--block-size``) tiles."""
    from shard_tools import pack

    props = labels.to_numpy(np.float64)
    props = props / props.sum(1, keepdims=True)
    tiles = [pack.Tile(str(i), Path(f"{i}.tif"), Path(f"{i}.tif")) for i in labels.index]
    blocks = np.arange(len(tiles)) // pack.block_size_for(block, FOLDS, len(tiles))
    fold_of = pack.assign_folds(props, FOLDS, SEED, blocks)
    order = (id_order if in_id_order else pack.train_order)(tiles, fold_of, SEED)
    row = {t.id: k for k, t in enumerate(tiles)}
    jobs = [j for j in pack.plan_shards(Path("."), order, pack.shard_limit(None, None)) if j.fold != VALIDATION_FOLD]
    contents = {str(j.path): (np.array([int(t.id) for t in j.tiles]), props[[row[t.id] for t in j.tiles]])
                for j in jobs}
    return [(str(j.path), len(j.tiles)) for j in jobs], contents


def stream_class(contents: dict):
    from dist_lc.data import ShardStream, segments

    class LabelStream(ShardStream):
        """The training stream with each sample its tile's id and class proportions."""

        def _samples(self, shards, start, stop, rng):
            for seg in segments(shards, start, stop):
                ids, props = contents[seg.path]
                for k in range(seg.skip, seg.skip + seg.take):
                    yield ids[k], props[k]

    return LabelStream


def epoch_batches(shards, contents, world: int, workers: int, micro: int, epoch: int) -> list:
    """(ids, proportions) of every micro-batch of one epoch, over every rank and loader worker."""
    from dist_lc import data

    steps = data.train_steps(sum(c for _, c in shards), world, micro, 1)
    n, out = steps * micro, []
    for rank in range(world):
        stream = stream_class(contents)(shards, rank * n, (rank + 1) * n, micro, train=True,
                                        shuffle_buffer=SHUFFLE_BUFFER, seed=SEED, epoch=epoch, rank=rank, shuffle=True)
        for wid in range(max(workers, 1)):
            info = types.SimpleNamespace(id=wid, num_workers=max(workers, 1))
            with mock.patch.object(data, "get_worker_info", lambda: info):
                samples = list(stream.samples())
            for b in range(0, len(samples) - micro + 1, micro):
                chunk = samples[b: b + micro]
                out.append((np.array([s[0] for s in chunk]), np.stack([s[1] for s in chunk])))
    return out


def pair_stats(batches) -> tuple[float, float]:
    """Means over batches of (mean L1 of class proportions, median id distance) over a batch's pairs."""
    i, j = np.triu_indices(len(batches[0][0]), 1)
    l1 = [np.abs(p[i] - p[j]).sum(1).mean() for _, p in batches]
    gap = [np.median(np.abs(ids[i] - ids[j])) for ids, _ in batches]
    return float(np.mean(l1)), float(np.mean(gap))


def random_batches(batches, seed: int = 0) -> list:
    """The same tiles dealt into batches of the same size at random."""
    ids = np.concatenate([b[0] for b in batches])
    props = np.concatenate([b[1] for b in batches])
    size = len(batches[0][0])
    order = np.random.default_rng(seed).permutation(len(ids))[: len(ids) // size * size].reshape(-1, size)
    return [(ids[o], props[o]) for o in order]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=Path, default=SAMPLE_SRC / "train_labels.csv",
                    help="the official train_labels.csv (default: the one beside the sample)")
    ap.add_argument("--micro", type=int, default=16, help="tiles per micro-batch")
    ap.add_argument("--layouts", nargs="+", default=["1x2", "8x8"], help="RANKSxWORKERS per layout")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the first 2,000 tiles, one epoch (a smoke run)")
    args = ap.parse_args(argv)
    labels = pd.read_csv(args.labels).set_index("sample_id").sort_index()
    if args.quick:
        labels, args.epochs = labels.iloc[:2000], 1
    packs = {name: planned_shards(labels, in_id, block) for name, in_id, block in PACKS}
    rows = []
    for layout in args.layouts:
        world, workers = (int(x) for x in layout.split("x"))
        found = {name: [b for e in range(args.epochs) for b in epoch_batches(*packs[name], world, workers, args.micro, e)]
                 for name in packs}
        for name, batches in found.items():
            rows.append([layout, name, *(f"{x:.3f}" if k == 0 else f"{x:.0f}" for k, x in enumerate(pair_stats(batches))),
                         len(batches)])
        rows.append([layout, "random batches of the same tiles",
                     *(f"{x:.3f}" if k == 0 else f"{x:.0f}"
                       for k, x in enumerate(pair_stats(random_batches(found[PACKS[0][0]])))), "–"])
    shards = len(packs[PACKS[0][0]][0])
    print(f"Machine: {machine_line()}; {args.labels} ({len(labels)} tiles), {FOLDS} folds (fold {VALIDATION_FOLD} "
          f"held out), {shards} training shards of 100 MB, micro-batches of {args.micro}, shuffle buffer "
          f"{SHUFFLE_BUFFER}, {args.epochs} epoch(s)\n")
    print(table(["ranks × workers", "pack", "L1 of class proportions, two tiles of a batch", "median id distance",
                 "batches"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
