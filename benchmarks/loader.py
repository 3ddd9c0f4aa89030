"""The data path alone (no model): tiles per second one rank's loader delivers with 0, 1, 2, 4, 8 and
all workers, and what the rank itself spends per tile, against the previous loader in the same run.

    python benchmarks/loader.py [--shards DIR] [--rounds 2] [--epochs 2] [--workers 0 1 2 4 8 all] [--json F]
    python benchmarks/loader.py --quick          # the test suite's smoke run

Measured, rounds interleaved so that all share the machine's state (page cache warm):

- ``raw read``: every training shard read with plain ``read()`` (the ceiling: what storage and the
  page cache give), in tiles/s;
- ``now``: ``dist_lc.data.train_loader`` as the trainer uses it (one rank's epoch plan, shuffle
  buffer, augmentation, full 256² tiles): one loader for ``--epochs`` epochs, its workers started
  once, batches in the rank's slot ring; start-up included;
- ``before``: the loader this one replaced, on the same stream: a new DataLoader per epoch whose
  workers are forked from the rank, every tensor of every batch a new shared-memory segment;
- ``rank side``: the same two loaders over workers that serve decoded tiles from memory (a copy per
  tile), so that the rank's side is what is timed: the rank's CPU time per tile (all its threads)
  and the tiles/s it reaches. The consumer touches every page of each batch, as a copy to the
  device would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ensure_shards, log, machine_line, median, table  # noqa: E402

MICRO = 16
PAGE_U16 = 2048   # uint16 values per 4 KiB page


def raw_read(manifest) -> float:
    """Tiles/s of reading every training shard's bytes once."""
    started, tiles = time.perf_counter(), 0
    for entry in manifest.shards("train"):
        with open(manifest.shard_path(entry), "rb") as f:
            while f.read(1 << 22):
                pass
        tiles += entry["count"]
    return tiles / (time.perf_counter() - started)


def consume(batches) -> int:
    """Tiles of a pass, each page of every batch touched (what a copy to the device reads)."""
    tiles = 0
    for batch in batches:
        _ = batch["image"].reshape(-1)[::PAGE_U16].sum().item() + batch["mask"].reshape(-1)[::4096].sum().item()
        tiles += len(batch["key"])
    return tiles


def stream_args(manifest) -> tuple[dict, list]:
    from dist_lc.data import listed_shards, train_steps

    shards, sizes = listed_shards(manifest, "train", None)
    n = train_steps(sum(c for _, c in shards), 1, MICRO, 1) * MICRO
    return dict(shards=shards, start=0, stop=n, batch_size=MICRO, train=True, augment=True, shuffle_buffer=64,
                seed=0, shuffle=True, sizes=sizes), shards


def measure(open_pass, memory: bool) -> tuple[int, float, float]:
    """(tiles, seconds, rank CPU seconds) of one pass, worker start-up included; from memory, from
    the second batch on (the workers' caches fill before their first)."""
    t, c = time.perf_counter(), time.process_time()
    with open_pass() as batches:
        if memory:
            consume([next(batches)])
            t, c = time.perf_counter(), time.process_time()
        tiles = consume(batches)
    return tiles, time.perf_counter() - t, time.process_time() - c


def summary(passes: list) -> tuple[float, float, float]:
    """(tiles/s after the first pass, rank CPU ms per tile after it, tiles/s of the first pass)."""
    later = passes[1:] or passes
    tiles = sum(p[0] for p in later)
    return tiles / sum(p[1] for p in later), 1e3 * sum(p[2] for p in later) / tiles, passes[0][0] / passes[0][1]


def run_now(manifest, workers: int, epochs: int, memory: bool) -> tuple[float, float, float]:
    """:func:`summary` of ``epochs`` passes through one loader (workers started once)."""
    from loader_streams import MemoryStream

    from dist_lc.data import ShardStream
    from dist_lc.loading import Loader

    kwargs, _ = stream_args(manifest)
    with Loader((MemoryStream if memory else ShardStream)(**kwargs), workers) as loader:
        passes = [measure(lambda: loader.batches(epoch), memory) for epoch in range(epochs)]
    return summary(passes)


def run_before(manifest, workers: int, epochs: int, memory: bool) -> tuple[float, float, float]:
    """The same through the previous loader: workers forked from the rank for each pass."""
    from loader_streams import PreviousMemoryStream, PreviousStream, previous_pass

    kwargs, _ = stream_args(manifest)
    stream = PreviousMemoryStream if memory else PreviousStream
    passes = [measure(lambda: previous_pass(stream(**kwargs, epoch=epoch), workers), memory) for epoch in range(epochs)]
    return summary(passes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="shard folder (default: the real sample, packed under --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_bench"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="passes per loader; rates are of those after the first")
    ap.add_argument("--workers", nargs="+", default=["0", "1", "2", "4", "8", "all"],
                    help="worker counts; 'all' = the cores this process may use")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="one round, one epoch, workers 0 and 1 (a smoke run)")
    args = ap.parse_args(argv)
    from shard_tools.manifest import load_manifest
    from lc_common.resources import usable_cores

    if args.quick:
        args.rounds, args.epochs, args.workers = 1, 2, ["0", "1"]
    counts = sorted({usable_cores() if w == "all" else int(w) for w in args.workers})
    manifest = load_manifest(args.shards or ensure_shards(args.work / "sample-shards"))
    side = [w for w in counts if 1 <= w <= 2] or counts[:1]
    cases = [(p, w, False) for p in ("now", "before") for w in counts] + [(p, w, True) for p in ("now", "before")
                                                                         for w in side]
    results: dict = {"raw": [], **{f"{p}|{w}|{'memory' if m else 'shards'}": [] for p, w, m in cases}}
    for r in range(args.rounds):
        results["raw"].append(raw_read(manifest))
        for path, w, memory in cases[r % len(cases):] + cases[:r % len(cases)]:   # rotated order per round
            run = run_now if path == "now" else run_before
            results[f"{path}|{w}|{'memory' if memory else 'shards'}"].append(run(manifest, w, args.epochs, memory))
        log(f"round {r + 1}/{args.rounds} done")

    def rate(key, first=False):
        return median([x[2 if first else 0] for x in results[key]])

    def cpu(key):
        return median([x[1] for x in results[key]])

    one = rate("now|1|shards") if 1 in counts else None
    rows = [[w, f"{rate(f'now|{w}|shards'):.0f}", f"{rate(f'before|{w}|shards'):.0f}",
             f"{rate(f'now|{w}|shards') / rate(f'before|{w}|shards'):.2f}×",
             f"{rate(f'now|{w}|shards') / one:.2f}×" if one and w else "–",
             f"{rate(f'now|{w}|shards', first=True):.0f}", f"{rate(f'before|{w}|shards', first=True):.0f}"]
            for w in counts]
    side_rows = [[w, f"{cpu(f'now|{w}|memory'):.3f}", f"{cpu(f'before|{w}|memory'):.3f}",
                  f"{rate(f'now|{w}|memory'):.0f}", f"{rate(f'before|{w}|memory'):.0f}"] for w in side]
    print(f"Machine: {machine_line()}; {manifest.data['counts']['train']} training tiles (256²), batches of "
          f"{MICRO}, {args.epochs} epoch(s) per loader (rates: epochs 2 on), median of {args.rounds} round(s)\n")
    print(f"Raw read of the shards (the ceiling): {median(results['raw']):.0f} tiles/s\n")
    print(table(["workers", "now, tiles/s", "before, tiles/s", "now / before", "now / 1 worker",
                 "first epoch (start-up), now", "first epoch, before"], rows))
    print()
    print(table(["workers (tiles from memory)", "rank CPU ms/tile, now", "rank CPU ms/tile, before",
                 "now, tiles/s", "before, tiles/s"], side_rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
