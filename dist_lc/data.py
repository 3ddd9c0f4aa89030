"""Shards → batches, split across ranks and DataLoader workers.

How an epoch is laid out (the same on every rank, computed from the manifest alone):

* the epoch's shards are put in an order (shuffled with ``seed`` and ``epoch`` for training,
  manifest order otherwise) and their samples numbered 0..N-1 in that order;
* training: ``steps = N // (world × micro × accum)``; rank r reads the contiguous range
  ``[r·n, (r+1)·n)`` with ``n = steps × accum × micro``, so every rank runs exactly ``steps``
  optimizer steps of full micro-batches, whatever the shard sizes (at most
  ``world × micro × accum − 1`` samples, a different tail each epoch, wait for the next epoch);
* evaluation: ranges split as evenly as possible with nothing dropped: each tile once overall;
* inside a rank, the range is split into contiguous pieces for the DataLoader workers
  (in whole micro-batches for training), each worker streams only the shards its piece touches.

What crosses from a worker to its rank is what the shards hold: uint16 images (N, H, W, 4) and
uint8 masks (cropped, in training), written straight into the worker's next slot of the rank's batch
ring in shared memory (:mod:`dist_lc.loading`: no copy on the way, no new segment per batch), and
each training sample's flip/rotation as a (quarter turns, flip) row, drawn in the worker and applied
on the device (:func:`apply_views`); the float conversion and the normalisation happen on the device
too, in the network (:func:`to_nchw` turns the batch into NCHW with the channels-last layout, without
a copy). Shards are read by :mod:`shard_tools.tarstream`: the samples a worker skips are seeked
over, not read.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lc_common.errors import InputError
from lc_common.tiles import IMAGE_SHAPE, class_proportions
from shard_tools import tarstream
from shard_tools.format import decode_checked
from shard_tools.manifest import Manifest, is_url, open_shard, remote_reason, stop_reading

from . import views
from .loading import Loader


@dataclass(frozen=True)
class Segment:
    path: str
    skip: int   # samples to pass over at the start of the shard
    take: int   # samples to yield after that


def balanced_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of ``parts`` contiguous pieces of range(total), sizes differing by at most one."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def segments(shards: list[tuple[str, int]], start: int, stop: int) -> list[Segment]:
    """The pieces of shards that hold samples [start, stop) of their concatenation."""
    out, offset = [], 0
    for path, count in shards:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            out.append(Segment(path, lo - offset, hi - lo))
        offset += count
    return out


def check_present(sizes: list[tuple[str, int]]) -> None:
    """Every shard of the list is there with its manifest's size: checked by every rank before each
    pass, so that all of them stop with the same line instead of one rank failing mid-epoch."""
    for path, expected in sizes:
        if is_url(path):  # a URL has no size to look at without a request
            continue
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise InputError(f"{path}: shard missing (its manifest lists it); run `lc-shard verify` on its "
                             "folder") from None
        if size != expected:
            raise InputError(f"{path}: shard is {size} bytes, its manifest says {expected} (truncated or "
                             "replaced); run `lc-shard verify` on its folder")


def listed_shards(manifest: Manifest, split: str, folds) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(path, sample count) of each shard of the split (and folds) in manifest order, and (path, bytes)."""
    listed = manifest.shards(split, folds)
    paths = [str(manifest.shard_path(e)) for e in listed]
    return ([(p, int(e["count"])) for p, e in zip(paths, listed)],
            [(p, int(e["bytes"])) for p, e in zip(paths, listed)])


def shuffled(entries: list, seed: int) -> list:
    """The shards in an epoch's order."""
    order = np.random.default_rng(seed).permutation(len(entries))
    return [entries[i] for i in order]


def epoch_shard_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def train_steps(total: int, world: int, micro: int, accum: int) -> int:
    return total // (world * micro * accum)


def read_segment(seg: Segment):
    """Raw samples of one shard piece; a missing, short or corrupt shard is an InputError naming it."""
    end, seen, whole = seg.skip + seg.take, [], False
    try:
        stream, seekable = open_shard(seg.path)
        try:
            for count, sample in enumerate(tarstream.samples(stream, seg.skip, seekable=seekable, seen=seen), 1):
                yield sample
                if count == seg.take:
                    break
            else:
                whole = True
        finally:
            if whole:
                stream.close()
            else:
                stop_reading(stream)
    except InputError as exc:
        raise InputError(f"{seg.path}: {exc}; run `lc-shard verify` on its folder"
                         if isinstance(exc, tarstream.TarError) else str(exc)) from None
    except OSError as exc:
        if is_url(seg.path):   # the server or the command failed, not the shard
            raise InputError(f"{seg.path}: cannot read the shard ({remote_reason(exc)})") from None
        raise InputError(f"{seg.path}: cannot read the shard ({exc.strerror or exc}); "
                         "run `lc-shard verify` on its folder") from None
    if len(seen) < end:  # a rank short of samples would leave the others waiting in the all-reduce
        raise InputError(f"{seg.path}: the shard ends after {len(seen)} samples, its manifest lists at least {end}; "
                         f"run `lc-shard verify` on its folder")


def decoded_segment(seg: Segment, split: str):
    """``(key, image, mask, props)`` of each sample of one shard piece, checked; errors name the shard."""
    for raw in read_segment(seg):
        try:
            yield decode_checked(raw, split)
        except InputError as exc:
            raise InputError(f"{seg.path}: {exc}; run `lc-shard verify` on its folder") from None


def random_view(rng: np.random.Generator) -> tuple[int, bool]:
    """One of the 8 flips/rotations (the benchmark's flips and 90°/270° rotations): (quarter turns, flip)."""
    return views.of_code(int(rng.integers(8)))   # one draw: a generator call costs more than the rest of this


def turn(image: np.ndarray, mask: np.ndarray, k: int, flip: bool):
    """An (H, W, ...) image and its mask turned alike: numpy views, no copy."""
    return views.turn(image, k, flip), views.turn(mask, k, flip)


def random_flip_rotate(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """A random view of an (H, W, ...) image and its mask alike, in numpy (what :func:`apply_views`
    does to a whole batch on the device, with the same draws)."""
    return turn(image, mask, *random_view(rng))


def copy_to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``. A host tensor bound for a GPU is page-locked first (unless it is already, as
    the loader's ring slots are) and copied without making the host wait: from pageable memory the
    copy may wait. Left pageable where the driver refuses to page-lock more."""
    if device.type != "cuda":
        return t.to(device)
    if t.device.type == "cpu" and not t.is_pinned():
        try:
            t = t.pin_memory()
        except RuntimeError:
            pass
    return t.to(device, non_blocking=True)


def apply_views(image: torch.Tensor, mask: torch.Tensor, drawn: torch.Tensor):
    """Turn each sample of a batch as loaded ((N, H, W, 4) uint16 images, (N, H, W) masks) by its
    (quarter turns, flip) row of ``drawn``, where the batch already is (the training device).

    Done there rather than in the loader workers: a rotation is a transposing copy, the costliest
    step of a worker's sample; on a GPU it is a few microseconds per batch. Pixels move as 8-byte
    words (:func:`as_pixels`), which every device supports, unlike uint16. The samples are grouped
    by view on the host (``drawn`` is the loader's CPU tensor) and their indices reach the device in
    one copy that does not wait: a blocking copy would make the host wait for the device's queue.
    """
    pixels = image.view(torch.int64)[..., 0]
    out_px, out_mask = torch.empty_like(pixels), torch.empty_like(mask)
    code = drawn[:, 0].long() * 2 + drawn[:, 1].long()
    order = torch.argsort(code, stable=True)   # each view's samples together, in batch order
    values, counts = torch.unique_consecutive(code[order], return_counts=True)
    order = copy_to(order, image.device)
    start = 0
    for value, count in zip(values.tolist(), counts.tolist()):
        idx, start = order[start:start + count], start + count
        k, flip = views.of_code(value)
        out_px[idx] = views.turn(pixels[idx], k, flip, axes=(1, 2))
        out_mask[idx] = views.turn(mask[idx], k, flip, axes=(1, 2))
    return out_px.unsqueeze(-1).view(torch.uint16), out_mask


def random_crop(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator):
    h, w = mask.shape
    y, x = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
    return image[y:y + size, x:x + size], mask[y:y + size, x:x + size]


def as_pixels(image: np.ndarray) -> np.ndarray:
    """An (H, W, 4) uint16 image as an (H, W) array of 8-byte pixels (a view): flipping, rotating and
    copying whole pixels is several times faster than moving 2-byte values with a stride of 4."""
    return image.view(np.uint64)[..., 0]


class BatchBuilder:
    """Fills one batch: each sample's (possibly flipped or cropped) views are copied once, into the
    memory the rank reads. Images arrive as 8-byte pixels (:func:`as_pixels`) and leave as
    (N, H, W, 4) uint16.

    In a loader worker with a :class:`~dist_lc.loading.BatchRing`, that memory is the worker's next
    slot and the batch carries ``ring = (worker, seq, rows)`` instead of the pixels; elsewhere (no
    workers, or a tile that does not fit the slots) it is a new tensor, in shared memory inside a
    worker. Proportions and views travel as numpy arrays (pickled by value: no shared segment)."""

    def __init__(self, size: int, ring=None, counter=None):
        self.size, self.rows, self.ring, self.counter = size, [], ring, counter

    def add(self, key, image, mask, props, view=None) -> dict | None:
        self.rows.append((key, image, mask, props, view))
        return self.take() if len(self.rows) == self.size else None

    def _buffers(self, rows: int, h: int, w: int, masks: bool):
        """(image, mask, ring reference or None) to write a batch of ``rows`` tiles into."""
        info = get_worker_info()
        if info is not None and self.ring is not None and self.ring.fits(rows, h, w) \
                and (not masks or self.ring.mask is not None):
            seq = self.counter.next()
            image, mask = self.ring.claim(info.id, seq)
            return image[:rows], (mask[:rows] if masks else None), (info.id, seq, rows)

        def empty(shape, dtype):
            out = torch.empty(shape, dtype=dtype)
            return out.share_memory_() if info is not None else out   # sending it then copies nothing

        return (empty((rows, h, w, 4), torch.uint16), empty((rows, h, w), torch.uint8) if masks else None, None)

    def take(self) -> dict | None:
        if not self.rows:
            return None
        rows, self.rows = self.rows, []
        h, w = rows[0][1].shape
        masks = rows[0][2] is not None
        image, mask, ref = self._buffers(len(rows), h, w, masks)
        view = image.numpy().view(np.uint64)[..., 0]
        for i, row in enumerate(rows):
            view[i] = row[1]
        batch = {"key": [r[0] for r in rows]}
        if ref is None:
            batch["image"] = image
        else:
            batch["ring"] = ref
        if masks:
            mview = mask.numpy()
            for i, row in enumerate(rows):
                mview[i] = row[2]
            if ref is None:
                batch["mask"] = mask
            batch["props"] = np.stack([r[3] for r in rows]).astype(np.float32)
        if rows[0][4] is not None:  # the augmentation each sample still has to get (apply_views)
            batch["views"] = np.array([r[4] for r in rows], dtype=np.int8)
        return batch


class BatchCount:
    """A worker's count of the batches it has written, kept across passes (persistent workers)."""

    def __init__(self):
        self.value = -1

    def next(self) -> int:
        self.value += 1
        return self.value


def to_nchw(image: torch.Tensor) -> torch.Tensor:
    """A batch as loaded (N, H, W, C) as the network takes it: (N, C, H, W), channels-last, no copy."""
    return image.permute(0, 3, 1, 2)


class ShardStream(IterableDataset):
    """Batches of one rank's sample range; DataLoader workers take contiguous pieces of it.

    ``shards`` are in manifest order; with ``shuffle`` each pass puts them in its epoch's order
    (:func:`shuffled`). The epoch lives in shared memory (:meth:`set_epoch`), so that persistent
    workers, which hold their own copy of this object, follow the rank from one epoch to the next."""

    def __init__(self, shards, start, stop, batch_size, *, split="train", train=False, augment=False, crop=None,
                 shuffle_buffer=0, seed=0, epoch=0, rank=0, shuffle=False, sizes=()):
        super().__init__()
        self.shards, self.start, self.stop, self.split = shards, start, stop, split
        self.batch_size, self.train, self.augment, self.crop = batch_size, train, augment, crop
        self.shuffle_buffer, self.seed, self.rank, self.shuffle = shuffle_buffer, seed, rank, shuffle
        self.sizes = list(sizes)     # (path, bytes) to check before each pass
        self.ring = None             # set by dist_lc.loading.Loader when the stream has workers
        self._epoch = torch.tensor([epoch], dtype=torch.int64).share_memory_()
        self._counter = None         # a worker's batch count (created in the worker)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_counter"}

    def __setstate__(self, state):
        self.__dict__.update(state, _counter=None)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def check(self) -> None:
        check_present(self.sizes)

    def batch_shape(self) -> tuple[int, int, bool]:
        """(tiles per batch, tile side, masks) of what the stream yields: the loader's slot size."""
        return self.batch_size, (self.crop if self.train and self.crop else IMAGE_SHAPE[0]), True

    def _worker_range(self) -> tuple[int, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if self.train:  # whole micro-batches per worker
            b0, b1 = balanced_range((self.stop - self.start) // self.batch_size, nw, wid)
            return wid, self.start + b0 * self.batch_size, self.start + b1 * self.batch_size
        lo, hi = balanced_range(self.stop - self.start, nw, wid)
        return wid, self.start + lo, self.start + hi

    def _samples(self, shards, start, stop, rng):
        for seg in segments(shards, start, stop):
            for key, image, mask, props in decoded_segment(seg, self.split):
                image = as_pixels(image)
                if self.crop and mask is not None:
                    image, mask = random_crop(image, mask, self.crop, rng)
                    props = class_proportions(mask)
                view = random_view(rng) if self.augment and mask is not None else None
                yield key, image, mask, props, view

    def _shuffled(self, samples, rng):
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(int(rng.integers(len(buf))))
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def samples(self):
        """This worker's samples of the pass, in the order they are batched."""
        wid, start, stop = self._worker_range()
        epoch = self.epoch
        rng = np.random.default_rng([self.seed, epoch, self.rank, wid])
        shards = shuffled(self.shards, epoch_shard_seed(self.seed, epoch)) if self.shuffle else self.shards
        stream = self._samples(shards, start, stop, rng)
        if self.train and self.shuffle_buffer > 1:
            stream = self._shuffled(stream, rng)
        return stream

    def __iter__(self):
        stream = self.samples()
        if self._counter is None:
            self._counter = BatchCount()
        builder = BatchBuilder(self.batch_size, self.ring, self._counter)
        for sample in stream:
            batch = builder.add(*sample)
            if batch is not None:
                yield batch
        batch = builder.take()
        if batch is not None:
            yield batch


def train_loader(manifest: Manifest, folds, *, seed, world, rank, micro, accum, workers, epoch=0,
                 augment=True, crop=None, shuffle_buffer=64, device=None, timeout_s=300.0) -> tuple[Loader, int]:
    """The rank's training loader (one pass per epoch: ``loader.batches(epoch)``) and the number of
    optimizer steps each epoch feeds; the same on every epoch."""
    shards, sizes = listed_shards(manifest, "train", folds)
    check_present(sizes)
    total = sum(c for _, c in shards)
    steps = train_steps(total, world, micro, accum)
    if steps == 0:
        raise InputError(f"{manifest.root}: {total} training tiles are fewer than one effective batch "
                         f"({world} ranks × {micro} × {accum} accumulation)")
    n = steps * accum * micro
    ds = ShardStream(shards, rank * n, (rank + 1) * n, micro, train=True, augment=augment, crop=crop,
                     shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch, rank=rank, shuffle=True, sizes=sizes)
    return Loader(ds, workers, rank=rank, timeout_s=timeout_s, device=device), steps


def listing(tiles: int, lines) -> tuple[int, str]:
    """(tiles, a digest of ``lines``: the tile ids, or the shards' names and counts) of what a rank
    listed for a prediction pass: the ranks compare theirs (see :class:`~dist_lc.loading.Loader`)."""
    return tiles, hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def eval_loader(manifest: Manifest, split: str, folds, *, world, rank, batch_size, workers, device=None,
                timeout_s=300.0) -> Loader:
    """Each tile of the split (and folds) exactly once across ranks, in manifest order."""
    shards, sizes = listed_shards(manifest, split, folds)
    check_present(sizes)
    total = sum(c for _, c in shards)
    start, stop = balanced_range(total, world, rank)
    ds = ShardStream(shards, start, stop, batch_size, split=split, sizes=sizes)
    return Loader(ds, min(workers, max(1, stop - start)) if workers else 0, rank=rank, timeout_s=timeout_s,
                  device=device, listed=listing(total, (f"{Path(p).name} {c}" for p, c in shards)))


class TiffStream(IterableDataset):
    """Batches of image tiles read straight from the challenge's TIFF files (no shards)."""

    def __init__(self, items: list[tuple[str, str]], batch_size: int):
        super().__init__()
        self.items, self.batch_size = items, batch_size
        self.ring, self._counter = None, None

    def set_epoch(self, epoch: int) -> None:
        pass

    def check(self) -> None:
        pass

    def batch_shape(self) -> tuple[int, int, bool]:
        return self.batch_size, IMAGE_SHAPE[0], False

    def __iter__(self):
        from lc_common.tiles import read_image

        info = get_worker_info()
        lo, hi = balanced_range(len(self.items), info.num_workers if info else 1, info.id if info else 0)
        if self._counter is None:
            self._counter = BatchCount()
        builder = BatchBuilder(self.batch_size, self.ring, self._counter)
        for key, path in self.items[lo:hi]:
            batch = builder.add(key, as_pixels(np.ascontiguousarray(read_image(Path(path)))), None, None)
            if batch is not None:
                yield batch
        batch = builder.take()
        if batch is not None:
            yield batch


def tiff_loader(folder, *, world, rank, batch_size, workers, device=None, timeout_s=300.0) -> Loader:
    """Each ``<id>.tif`` of a folder exactly once across ranks, in id order."""
    from lc_common.tiles import id_sort_key, tiffs_by_id

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: --images folder does not exist" if not folder.exists() else
                         f"{folder}: --images is not a folder")
    found = tiffs_by_id(folder)
    if not found:
        raise InputError(f"{folder}: no <id>.tif tiles in the folder")
    items = [(key, str(found[key])) for key in sorted(found, key=id_sort_key)]
    start, stop = balanced_range(len(items), world, rank)
    mine = items[start:stop]
    return Loader(TiffStream(mine, batch_size), min(workers, max(1, len(mine))) if workers else 0, rank=rank,
                  timeout_s=timeout_s, device=device, listed=listing(len(items), (k for k, _ in items)))
