"""The data path alone (no model): how many tiles per second one loader core delivers, against the
raw read rate of the same shards and against the previous data path, in the same run.

    python benchmarks/loader.py [--shards DIR] [--rounds 3] [--epochs 2] [--json FILE]
    python benchmarks/loader.py --quick          # the test suite's smoke run

Measured, rounds interleaved so that all share the machine's state (page cache warm):

- ``raw read``: every training shard read with plain ``read()`` (the ceiling: what storage and the
  page cache give), expressed in tiles/s;
- ``loader``: ``dist_lc.data.train_loader`` as a rank uses it (one rank's epoch plan, shuffle
  buffer, augmentation), full 256² tiles and 96² crops, 0/1/2 DataLoader workers: batches taken
  as fast as they come, each touched once (the first byte of its image) as a consumer would; the
  flips/rotations the workers drew are applied by the consumer (``apply_views``, what the rank
  does on its device) and timed apart: ``rank views`` is that step's rate on this CPU;
- ``in worker``: the same loader with each sample flipped/rotated inside the worker (numpy views,
  then a transposing copy into the batch), as it was before the views moved to the device;
- ``previous``: the data path dist_lc had before (webdataset's tar reader, ``np.load`` per
  member, float32 images and int64 masks made in the worker, a per-sample ``torch.stack``), with
  the same plan, also with 0/1/2 workers.

Per loader core: with 0 workers the main process is the one core; with N workers, tiles/s ÷ N.
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_shards, log, machine_line, median, table  # noqa: E402


def raw_read(manifest) -> tuple[float, float]:
    """(seconds, tiles) to read every training shard's bytes once."""
    started, tiles = time.perf_counter(), 0
    for entry in manifest.shards("train"):
        with open(manifest.shard_path(entry), "rb") as f:
            while f.read(1 << 22):
                pass
        tiles += entry["count"]
    return time.perf_counter() - started, tiles


def _drain(loader) -> tuple[int, float]:
    """(tiles, seconds the consumer spent turning them by their views on this CPU): the views are
    the rank's work, not the loader's, so they are timed apart."""
    from dist_lc.data import apply_views, batches_of

    tiles, views_s = 0, 0.0
    with batches_of(loader) as batches:
        for batch in batches:
            _ = batch["image"].reshape(-1)[0].item()   # a consumer touches what it gets
            tiles += len(batch["key"])
            if "views" in batch:
                started = time.perf_counter()
                apply_views(batch["image"], batch["mask"], batch["views"])
                views_s += time.perf_counter() - started
    return tiles, views_s


def current(manifest, crop, workers, epoch, in_worker: bool = False) -> tuple[float, int, float]:
    """``train_loader`` as it is; ``in_worker``: with each sample turned inside the worker instead
    (the path before the views moved to the device, same draws, same plan)."""
    from unittest import mock

    from dist_lc import data

    stream = _worker_views_class() if in_worker else data.ShardStream
    with mock.patch.object(data, "ShardStream", stream):
        loader, _ = data.train_loader(manifest, list(range(manifest.num_folds)), epoch=epoch, seed=0, world=1,
                                      rank=0, micro=16, accum=1, workers=workers, crop=crop, shuffle_buffer=64)
    started = time.perf_counter()
    tiles, views_s = _drain(loader)
    return time.perf_counter() - started - views_s, tiles, views_s


@functools.lru_cache(maxsize=1)
def _worker_views_class():
    from dist_lc.data import ShardStream, turn

    class WorkerViews(ShardStream):
        def _samples(self, start, stop, rng):
            for key, image, mask, props, view in super()._samples(start, stop, rng):
                if view is not None:   # numpy views: the batch builder then makes a transposing copy
                    image, mask = turn(image, mask, *view)
                yield key, image, mask, props, None

    return WorkerViews


def previous(manifest, crop, workers, epoch) -> tuple[float, int]:
    """The data path before the shared-memory uint16 batches, rebuilt here as the reference."""
    import torch
    import webdataset as wds
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    from dist_lc.data import balanced_range, ordered_shards, segments, train_steps
    from shard_tools.format import class_proportions

    shards = ordered_shards(manifest, "train", list(range(manifest.num_folds)), shuffle_seed=epoch)
    total = sum(c for _, c in shards)
    n = train_steps(total, 1, 16, 1) * 16

    class Previous(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            b0, b1 = balanced_range(n // 16, nw, wid)
            rng = np.random.default_rng([0, epoch, 0, wid])
            batch, buf = [], []
            for seg in segments(shards, b0 * 16, b1 * 16):
                pipe = wds.DataPipeline(wds.SimpleShardList([seg.path]), wds.tarfile_to_samples())
                for i, raw in enumerate(pipe):
                    if i < seg.skip:
                        continue
                    if i >= seg.skip + seg.take:
                        break
                    image = np.load(io.BytesIO(raw["image.npy"]))
                    mask = np.load(io.BytesIO(raw["mask.npy"]))
                    k = int(rng.integers(4))
                    image, mask = np.rot90(image, k), np.rot90(mask, k)
                    if crop:
                        y, x = rng.integers(257 - crop, size=2)
                        image, mask = image[y:y + crop, x:x + crop], mask[y:y + crop, x:x + crop]
                    props = class_proportions(mask) if crop else np.load(io.BytesIO(raw["props.npy"]))
                    buf.append({"key": raw["__key__"],
                                "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1),
                                                                               dtype=np.float32)),
                                "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)),
                                "props": torch.from_numpy(np.asarray(props, dtype=np.float32))})
                    if len(buf) >= 64:
                        batch.append(buf.pop(int(rng.integers(len(buf)))))
                    if len(batch) == 16:
                        yield {"key": [s["key"] for s in batch],
                               **{k: torch.stack([s[k] for s in batch]) for k in ("image", "mask", "props")}}
                        batch = []
            for s in buf:
                batch.append(s)
                if len(batch) == 16:
                    yield {"key": [s["key"] for s in batch],
                           **{k: torch.stack([s[k] for s in batch]) for k in ("image", "mask", "props")}}
                    batch = []

    loader = DataLoader(Previous(), batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    started = time.perf_counter()
    tiles, _ = _drain(loader)
    return time.perf_counter() - started, tiles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="shard folder (default: the real sample, packed under --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_bench"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--crops", default="none,96", help="comma-separated crop sizes; none = full 256² tiles")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="one round, workers 0 and 1 (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.workers = 1, [0, 1]
    from shard_tools.manifest import load_manifest

    shards = args.shards or ensure_shards(args.work / "sample-shards")
    manifest = load_manifest(shards)
    crops = [None if c == "none" else int(c) for c in args.crops.split(",")]
    cases = [(path, crop, w) for path in ("current", "in worker", "previous") for crop in crops for w in args.workers]
    results = {"raw": [], **{f"{p}|{c}|{w}": [] for p, c, w in cases}, **{f"views|{c}": [] for c in crops}}
    for r in range(args.rounds):
        seconds, tiles = raw_read(manifest)
        results["raw"].append(tiles / seconds)
        for path, crop, w in cases[r % len(cases):] + cases[:r % len(cases)]:   # rotated order per round
            if path == "current":
                seconds, tiles, views_s = current(manifest, crop, w, epoch=r)
                results[f"views|{crop}"].append(tiles / views_s)
            elif path == "in worker":
                seconds, tiles, _ = current(manifest, crop, w, epoch=r, in_worker=True)
            else:
                seconds, tiles = previous(manifest, crop, w, epoch=r)
            results[f"{path}|{crop}|{w}"].append(tiles / seconds)
        log(f"round {r + 1}/{args.rounds} done")
    raw = median(results["raw"])
    rows = []
    for crop in crops:
        for w in args.workers:
            now, before = median(results[f"current|{crop}|{w}"]), median(results[f"previous|{crop}|{w}"])
            worker = median(results[f"in worker|{crop}|{w}"])
            cores = max(w, 1)
            rows.append([f"{crop or 256}²", w, f"{now:.0f}", f"{now / cores:.0f}", f"{worker / cores:.0f}",
                         f"{before / cores:.0f}", f"{now / worker:.2f}×", f"{now / before:.2f}×",
                         f"{now / cores / raw:.0%}", f"{median(results[f'views|{crop}']):.0f}"])
    print(f"Machine: {machine_line()}; {manifest.data['counts']['train']} training tiles, batches of 16, "
          f"median of {args.rounds} round(s)\n")
    print(f"Raw read of the shards (the ceiling): {raw:.0f} tiles/s\n")
    print(table(["tiles", "workers", "tiles/s", "per loader core", "views in the worker, per core",
                 "previous, per core", "vs views in the worker", "vs previous", "per core / raw read",
                 "rank views on this CPU, tiles/s"], rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "raw_tiles_per_s": raw, "results": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
