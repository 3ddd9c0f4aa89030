"""Pack the challenge's TIFF tiles into fold-pure WebDataset shards plus ``manifest.json``.

Two passes over the source, both in a worker pool (the parent only plans and collects):

1. *survey*: every mask is read and checked (shape, dtype, values 0..9) and its class pixel
   counts taken; every image's TIFF header is checked (shape, dtype). Folds are then assigned
   from the class proportions (:mod:`shard_tools.folds`).
2. *pack*: the shards are planned, fold by fold, each fold's tiles in a seeded random order
   (``train-f<k>-<nnnnnn>.tar``), then the test tiles in id order (``test-<nnnnnn>.tar``; every sample has the same size, so where a shard ends is known in
   advance); each worker writes whole shards: it reads, checks and encodes their tiles
   (:func:`format.encode_sample`), writes and hashes the tar, and sums the channel statistics
   exactly in integers. The parent receives only the manifest entries.

The shards are written into a hidden staging folder in the output folder and moved into place only
once every one is written, the old manifest deleted first and the new one written last and atomically:
a failed run (bad pixels, a full disk, a worker's error) leaves an earlier pack as it was, and no
manifest ever lists shards that are not there.
"""
from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import pickle
import shutil
import signal
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
import multiprocessing
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import __version__
from lc_common.errors import InputError, WriteError
from lc_common import locks
from .folds import assign_folds
from .format import ENCODING, FORMAT_VERSION, encode_sample
from lc_common.tiles import (CLASS_NAMES, IMAGE_DTYPE, IMAGE_SHAPE, MASK_DTYPE, NUM_CLASSES, check_image_header,
                             class_pixels, id_sort_key, read_image, read_mask, tiffs_by_id)
from lc_common.resources import usable_cores
from .manifest import MANIFEST_NAME, SHARD_NAME_PATTERN, Manifest, load_manifest, shard_name
from lc_common.atomic import fsync_dir, write_json_atomic

DEFAULT_SHARD_MB = 100  # ~150 tiles: enough shards per fold to spread over ranks × loader workers
SHARD_MTIME = 0  # fixed member mtime: shards are byte-for-byte reproducible
TAR_MEMBER_OVERHEAD = 1024  # header + padding per member, for the size-based shard limit
PIXELS_PER_TILE = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
STAGING_NAME = ".pack-staging"  # in the output folder: on its file system, so a shard moves in by a rename
LOCK_NAME = ".pack.lock"  # in the output folder while a pack writes there
# Folds of whole blocks of consecutive ids: the challenge numbers tiles row by row over a region, and a
# tile whose neighbours are in the training folds is scored as no held-out region would score it (at
# 500, about 11 rows; docs/BENCHMARKS.md, "Folds that hold out regions").
MAX_AUTO_BLOCK = 500
BLOCKS_PER_FOLD = 4


@dataclass(frozen=True)
class Tile:
    id: str
    image: Path
    mask: Path | None  # None for test tiles


# ---------------------------------------------------------------- source scan


def _pair_masks(images: dict[str, Path], masks: dict[str, Path], mask_dir: Path) -> list[Tile]:
    for tile_id, path in masks.items():
        if tile_id not in images:
            raise InputError(f"{path}: mask without a train image (no {path.parent.parent / 'images' / path.name})")
    for tile_id, path in images.items():
        if tile_id not in masks:
            raise InputError(f"{path}: train image without a mask (no {mask_dir / path.name})")
    return [Tile(i, images[i], masks[i]) for i in sorted(images, key=id_sort_key)]


def scan_source(src: Path) -> tuple[list[Tile], list[Tile]]:
    """Train and test tiles of a folder in the challenge layout, each list sorted by id."""
    if not src.is_dir():
        raise InputError(f"{src}: source folder does not exist" if not src.exists() else f"{src}: not a folder")
    train = _pair_masks(tiffs_by_id(src / "train" / "images"), tiffs_by_id(src / "train" / "masks"),
                        src / "train" / "masks")
    test_images = tiffs_by_id(src / "test" / "images")
    test = [Tile(i, test_images[i], None) for i in sorted(test_images, key=id_sort_key)]
    if not train and not test:
        raise InputError(f"{src}: no tiles found (expected train/images/<id>.tif and/or test/images/<id>.tif)")
    _refuse_shared_ids(train, test_images)
    return train, test


def _refuse_shared_ids(train: list[Tile], test_images: dict[str, Path]) -> None:
    """An id in both splits is refused, compared as a number as within a split (1.tif and 01.tif
    are one tile: as strings, both would be packed)."""
    train_by_number = {int(t.id): t for t in train}
    both = sorted((i for i in test_images if int(i) in train_by_number), key=id_sort_key)
    if both:
        also = train_by_number[int(both[0])].image
        raise InputError(f"{test_images[both[0]]}: id {both[0]!r} is both a train and a test tile (also {also})")


# ---------------------------------------------------------------- per-tile work (runs in workers)


def survey_tile(tile: Tile) -> np.ndarray | None:
    """Pass 1: check the image header and the mask; class pixel counts (10,) for train tiles."""
    check_image_header(tile.image)
    if tile.mask is None:
        return None
    return class_pixels(read_mask(tile.mask))


def load_tile(tile: Tile) -> tuple[dict, dict | None]:
    """Pass 2: the encoded sample and, for train tiles, the image's integer channel sums."""
    image = read_image(tile.image)
    if tile.mask is None:
        return encode_sample(tile.id, image), None
    return encode_sample(tile.id, image, read_mask(tile.mask)), channel_sums(image)


def channel_sums(image: np.ndarray) -> dict:
    """Exact per-channel integer sum, sum of squares, min and max of one H×W×C image."""
    pixels = image.reshape(-1, image.shape[-1]).astype(np.int64)
    return {"n": len(pixels), "sum": pixels.sum(axis=0).tolist(), "sumsq": (pixels * pixels).sum(axis=0).tolist(),
            "min": pixels.min(axis=0).tolist(), "max": pixels.max(axis=0).tolist()}


# ---------------------------------------------------------------- worker pool


def _ordered_imap(pool, fn, items, window: int):
    """``pool.map`` with at most ``window`` tiles in flight, so fast readers cannot fill memory.

    ``fn`` and each item are pickled here first: tasks that fail to pickle in the pool's feeder
    thread can make Python 3.11's ``shutdown(cancel_futures=True)`` wait for ever (CPython
    gh-116685), where this raises the pickling error at once. Items are a tile's paths: cheap."""
    pickle.dumps(fn)
    pending: deque = deque()
    for item in items:
        pickle.dumps(item)
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _deaf_to_ctrl_c() -> None:
    """A reader process ignores the terminal's SIGINT: the packing process takes it and shuts the pool
    down; each reader dying of it would print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _mapper(workers: int):
    """A ``map(fn, items)`` that yields results in order: in-process for 0/1 worker, else a pool.

    A ProcessPoolExecutor rather than multiprocessing.Pool: on an error the Pool's ``terminate()``
    could block for ever joining its task thread (seen once, after both workers had exited), where
    the executor cancels what has not started, lets the few tiles in flight finish and returns."""
    if workers <= 1:
        yield lambda fn, items: map(fn, items)
        return
    # spawn, not fork: a caller that already runs threads (torch, OpenMP) would deadlock forked children
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_deaf_to_ctrl_c)
    try:
        yield lambda fn, items: _ordered_imap(pool, fn, items, window=8 * workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def default_workers() -> int:
    return min(16, usable_cores())


# ---------------------------------------------------------------- shard writing


class _HashingFile:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, path: Path):
        self.file = open(path, "xb")
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


@dataclass(frozen=True)
class ShardLimit:
    samples: int | None = None
    bytes: int | None = None

    def full(self, count: int, size: int, incoming: int) -> bool:
        if count == 0:
            return False
        if self.samples is not None:
            return count >= self.samples
        return size + incoming > self.bytes


def shard_limit(samples_per_shard, shard_size_mb) -> ShardLimit:
    if samples_per_shard is not None and shard_size_mb is not None:
        raise InputError("give either samples_per_shard (--samples-per-shard) or shard_size_mb (--shard-size), not both")
    if samples_per_shard is not None:
        if int(samples_per_shard) < 1:
            raise InputError(f"samples per shard must be at least 1, got {samples_per_shard}")
        return ShardLimit(samples=int(samples_per_shard))
    size_mb = DEFAULT_SHARD_MB if shard_size_mb is None else shard_size_mb
    if not (size_mb > 0 and math.isfinite(size_mb)):
        raise InputError(f"shard size must be a positive number of MB, got {size_mb}")
    return ShardLimit(bytes=int(size_mb * 1_000_000))


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: its name and tiles, fixed before any is written."""
    path: Path
    split: str
    fold: int | None
    tiles: tuple


@functools.cache   # fixed by the data contract: planned once per split, not once per tile
def sample_bytes(split: str) -> int:
    """Bytes a sample takes in a shard (members + tar headers and padding): fixed by the data contract."""
    image = np.zeros(IMAGE_SHAPE, IMAGE_DTYPE)
    sample = encode_sample("0", image, np.zeros(IMAGE_SHAPE[:2], MASK_DTYPE) if split == "train" else None)
    return sum(len(v) + TAR_MEMBER_OVERHEAD for k, v in sample.items() if k != "__key__")


def train_order(train: list[Tile], fold_of: np.ndarray, seed: int) -> list[tuple[Tile, str, int]]:
    """The train tiles grouped by fold, each fold in a seeded random order. Neighbouring ids are
    neighbouring places with alike labels; in id order a fold's shards would each hold one region,
    and the loader's small shuffle buffer would then feed batches of one landscape."""
    rng = np.random.default_rng([int(seed), 1])   # a stream apart from the fold assignment's
    order = []
    for k in np.unique(fold_of):
        members = [t for t, f in zip(train, fold_of) if f == k]
        order += [(members[i], "train", int(k)) for i in rng.permutation(len(members))]
    return order


def plan_shards(folder: Path, order: list[tuple[Tile, str, int | None]], limit: ShardLimit) -> list[ShardJob]:
    """Consecutive tiles of each group (a fold, or the test split) cut into numbered shards by ``limit``,
    to be written in ``folder`` (the staging folder: they are moved into the output once all are written).

    Every sample of a split has the same size, so the cut is known before anything is read: each
    shard can then be written by a worker of its own, the parent only collecting its entry.
    """
    jobs, current, group, index, size = [], [], None, 0, 0
    for tile, split, fold in order:
        incoming = sample_bytes(split)
        if (split, fold) != group or limit.full(len(current), size, incoming):
            if current:
                jobs.append(ShardJob(folder / shard_name(*group, index), *group, tuple(current)))
            index = 0 if (split, fold) != group else index + 1
            group, current, size = (split, fold), [], 0
        current.append(tile)
        size += incoming
    if current:
        jobs.append(ShardJob(folder / shard_name(*group, index), *group, tuple(current)))
    return jobs


def write_sample(tar: tarfile.TarFile, sample: dict) -> None:
    """One sample's members, in name order, with a fixed mtime, mode and owner (as webdataset's TarWriter
    writes them): shards are byte-for-byte reproducible."""
    key = sample["__key__"]
    for suffix in sorted(k for k in sample if k != "__key__"):
        data = sample[suffix]
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size, info.mtime, info.mode, info.uname, info.gname = len(data), SHARD_MTIME, 0o444, "bigdata", "bigdata"
        tar.addfile(info, io.BytesIO(data))


def write_shard(job: ShardJob) -> tuple[dict, dict | None]:
    """Read, check and write one shard's tiles (in a worker); its manifest entry and its train
    tiles' channel sums. A tile that fails its checks raises, naming it."""
    stats = ChannelStats(IMAGE_SHAPE[2])
    keys = []
    try:
        file = _HashingFile(job.path)
        with tarfile.open(fileobj=file, mode="w|") as tar:
            for tile in job.tiles:
                sample, sums = load_tile(tile)
                write_sample(tar, sample)
                keys.append(tile.id)
                if sums is not None:
                    stats.add(sums)
        file.close()
    except OSError as exc:   # the shard's (a tile that cannot be read is an InputError)
        raise WriteError(job.path, exc) from None
    entry = {"name": job.path.name, "split": job.split, "fold": job.fold, "count": len(keys),
             "bytes": file.bytes, "sha256": file.sha.hexdigest(), "keys": keys}
    return entry, stats.totals() if job.split == "train" else None


# ---------------------------------------------------------------- statistics


class ChannelStats:
    """Per-channel mean/std/min/max over all train pixels, from exact integer sums."""

    def __init__(self, channels: int):
        self.n = 0
        self.sum = [0] * channels
        self.sumsq = [0] * channels
        self.min = [None] * channels
        self.max = [None] * channels

    def totals(self) -> dict:
        """These sums in the form :meth:`add` takes (to add one set of statistics to another)."""
        return {"n": self.n, "sum": self.sum, "sumsq": self.sumsq, "min": self.min, "max": self.max}

    def add(self, tile: dict) -> None:
        if not tile["n"]:
            return
        self.n += tile["n"]
        self.sum = [a + b for a, b in zip(self.sum, tile["sum"])]
        self.sumsq = [a + b for a, b in zip(self.sumsq, tile["sumsq"])]
        self.min = [b if a is None else min(a, b) for a, b in zip(self.min, tile["min"])]
        self.max = [b if a is None else max(a, b) for a, b in zip(self.max, tile["max"])]

    def to_json(self) -> dict:
        """Python int division is correctly rounded: mean and variance are the exact values, rounded once."""
        if self.n == 0:
            return {"mean": [], "std": [], "min": [], "max": []}
        var = [(self.n * q - s * s) / (self.n * self.n) for s, q in zip(self.sum, self.sumsq)]
        return {"mean": [s / self.n for s in self.sum], "std": [float(np.sqrt(v)) for v in var],
                "min": self.min, "max": self.max}


# ---------------------------------------------------------------- output folder


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder unless ``overwrite`` (checked before
    any work; an earlier pack is replaced only once every new shard is written: :func:`publish`).
    A staging folder or lock file alone is a killed run's leftover, which this run takes over."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(p.name not in (STAGING_NAME, LOCK_NAME) for p in out.iterdir()) and not overwrite:
        raise InputError(f"{out}: output folder is not empty (pass --overwrite to replace its shards)")


@contextmanager
def claimed(out: Path, overwrite: bool):
    """``out`` made and held by this pack while the block runs (a second pack into it would empty this
    one's staging folder); a folder this run made goes again if it fails."""
    with locks.claimed(out, f"{out}: another pack ({{holder}}) is writing into this folder; wait for it to end or "
                            "choose another --out", LOCK_NAME):
        check_out(out, overwrite)   # again, held: a pack that ended meanwhile may have filled it
        yield


def stage(out: Path) -> Path:
    """An empty staging folder for this run's shards in ``out``."""
    staging = out / STAGING_NAME
    try:
        if os.path.lexists(staging):
            shutil.rmtree(staging)   # a killed run's leftover
        staging.mkdir()
    except OSError as exc:
        raise WriteError(staging, exc) from None
    return staging


def _remove_shards(out: Path) -> None:
    """Delete every file of ``out`` named like a shard (so a smaller pack leaves no stale ones) or
    like an interrupted manifest write's temporary file."""
    for path in out.iterdir():
        if SHARD_NAME_PATTERN.match(path.name) or path.name.startswith(f".{MANIFEST_NAME}."):
            path.unlink()


def _move_in(staging: Path, out: Path, names: list[str]) -> None:
    """Replace the shards of ``out`` by the staged ones (whose data each writer has fsynced)."""
    try:
        _remove_shards(out)
        for name in names:
            os.replace(staging / name, out / name)
        staging.rmdir()
        fsync_dir(out)   # the shards' names are durable before the manifest that lists them
    except OSError as exc:
        raise WriteError(out, exc) from None


def publish(staging: Path, out: Path, names: list[str], manifest: dict) -> None:
    """Swap the staged shards for an earlier pack's and write the manifest: the old manifest goes
    FIRST (a folder without one is refused by every reader) and the new one comes last, so no
    manifest ever lists shards that are not there. Past the first step the old pack is gone, so a
    failure removes the manifest and every shard: a folder without a manifest is no pack anyway."""
    try:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        fsync_dir(out)
    except OSError as exc:
        raise WriteError(out / MANIFEST_NAME, exc) from None
    try:
        _move_in(staging, out, names)
        write_json_atomic(out / MANIFEST_NAME, manifest)
    except BaseException:
        with suppress(OSError):   # the manifest first: it may be in place if only the folder's fsync failed
            (out / MANIFEST_NAME).unlink(missing_ok=True)
            _remove_shards(out)
        raise


def _check_folds(folds: int, n_train: int) -> None:
    if int(folds) < 1:
        raise InputError(f"--folds must be at least 1, got {folds}")
    if 0 < n_train < folds:
        raise InputError(f"cannot split {n_train} train tiles into {folds} folds")


def block_size_for(block_size, folds: int, n_train: int) -> int:
    """Train tiles per block of consecutive ids that go to one fold together. ``auto``: at most
    ``MAX_AUTO_BLOCK``, and at least ``BLOCKS_PER_FOLD`` blocks in each fold (1, tile by tile, for a
    set too small for that)."""
    if block_size == "auto":
        return int(min(MAX_AUTO_BLOCK, max(1, n_train // (BLOCKS_PER_FOLD * folds))))
    try:
        size = int(block_size)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(block_size).strip() != str(size):
        raise InputError(f"--block-size must be a whole number of tiles (1: tile by tile) or auto, got {block_size!r}")
    if 0 < n_train and -(-n_train // size) < folds:
        raise InputError(f"--block-size {size}: {n_train} train tiles make {-(-n_train // size)} block(s), "
                         f"fewer than the {folds} folds")
    return size


# ---------------------------------------------------------------- pack


def _survey(mapper, tiles: list[Tile], progress: bool) -> list:
    bar = tqdm(total=len(tiles), desc="survey", unit="tile", disable=not progress)
    counts = []
    for result in mapper(survey_tile, tiles):
        counts.append(result)
        bar.update()
    bar.close()
    return counts


def _write(mapper, jobs: list[ShardJob], stats: ChannelStats, progress: bool) -> list[dict]:
    bar = tqdm(total=sum(len(j.tiles) for j in jobs), desc="pack", unit="tile", disable=not progress)
    entries = []
    for job, (entry, sums) in zip(jobs, mapper(write_shard, jobs)):
        entries.append(entry)
        if sums is not None:
            stats.add(sums)
        bar.update(len(job.tiles))
    bar.close()
    return entries


def _manifest(src, train, test, fold_of, counts, folds, seed, block, entries, stats) -> dict:
    fold_pixels = {str(k): [0] * NUM_CLASSES for k in range(folds)}
    for f, c in zip(fold_of, counts):
        fold_pixels[str(f)] = [a + int(b) for a, b in zip(fold_pixels[str(f)], c)]
    return {
        "format_version": FORMAT_VERSION, "tool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": str(src.resolve()),
        "class_names": list(CLASS_NAMES), "encoding": dict(ENCODING),
        "image_shape": list(IMAGE_SHAPE), "image_dtype": IMAGE_DTYPE.name, "mask_dtype": MASK_DTYPE.name,
        "num_folds": int(folds), "seed": int(seed), "block_size": int(block),
        "counts": {"train": len(train), "test": len(test)},
        "shards": entries,
        "folds": {t.id: int(f) for t, f in zip(train, fold_of)},
        "fold_class_pixels": fold_pixels,
        "channel_stats": stats.to_json(),
    }


def pack(src, out, *, folds=5, seed=0, block_size="auto", samples_per_shard=None, shard_size_mb=None,
         workers=None, overwrite=False, progress=True) -> Manifest:
    """Pack ``src`` (challenge layout) into fold-pure shards in ``out``; returns the loaded manifest.

    ``folds``/``seed``: the stratified fold assignment; ``block_size``: tiles of consecutive ids that
    share a fold (:func:`block_size_for`: neighbouring ids are neighbouring places).
    ``samples_per_shard`` or ``shard_size_mb`` (default 100 MB): where a shard ends. ``workers``: reader processes (None: CPUs up to 16;
    0 or 1: read in this process). ``overwrite``: replace the shards and manifest of a non-empty
    ``out``, once every new shard is written (both packs are on the disk until then). Bad input raises
    :class:`InputError`; a run that fails while reading or writing leaves no file of its own behind
    and an earlier pack as it was.
    """
    src, out = Path(src), Path(out)
    limit = shard_limit(samples_per_shard, shard_size_mb)
    if int(seed) < 0:   # numpy's generators take none (before the survey, not after it)
        raise InputError(f"--seed must be 0 or more, got {seed}")
    train, test = scan_source(src)
    _check_folds(folds, len(train))
    block = block_size_for(block_size, folds, len(train))
    check_out(out, overwrite)   # before any work
    stats = ChannelStats(IMAGE_SHAPE[2])
    workers = default_workers() if workers is None else int(workers)
    staging = None
    with claimed(out, overwrite):
        try:
            with _mapper(workers) as mapper:
                counts = _survey(mapper, train + test, progress)[: len(train)]
                props = np.asarray(counts, dtype=np.float64).reshape(-1, NUM_CLASSES) / PIXELS_PER_TILE
                blocks = np.arange(len(train)) // block   # train is in id order
                fold_of = assign_folds(props, folds, seed, blocks) if train else np.empty(0, dtype=np.int64)
                staging = stage(out)
                order = train_order(train, fold_of, seed)
                jobs = plan_shards(staging, order + [(t, "test", None) for t in test], limit)
                entries = _write(mapper, jobs, stats, progress)
            manifest = _manifest(src, train, test, fold_of, counts, folds, seed, block, entries, stats)
            publish(staging, out, [e["name"] for e in entries], manifest)
        finally:
            if staging is not None:   # after the pool has drained: no worker still writes there
                shutil.rmtree(staging, ignore_errors=True)   # already gone after a success
    return load_manifest(out)
