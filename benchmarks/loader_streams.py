"""The datasets that ``loader.py`` times besides the trainer's own: kept in a module of their own so
that loader workers, which start without the benchmark script as ``__main__``, can import them."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_lc.data import ShardStream, decoded_segment, segments


class MemoryStream(ShardStream):
    """The trainer's stream with its tiles decoded once and then served from memory: a worker's own
    cost is then a copy per tile, so what limits the rate is the rank's side of the loader."""

    def _samples(self, shards, start, stop, rng):
        if not hasattr(self, "_cache"):
            self._cache = [s for seg in segments(shards, start, stop) for s in decoded_segment(seg, self.split)]
        from dist_lc.data import as_pixels

        for key, image, mask, props in self._cache:
            yield key, as_pixels(image), mask, props, None


class PreviousStream(ShardStream):
    """The stream as the loader before the batch ring sent it: every tensor of every batch (pixels,
    masks, proportions, views) in a shared-memory segment of its own."""

    def __iter__(self):
        for batch in super().__iter__():
            yield {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class PreviousMemoryStream(MemoryStream, PreviousStream):
    pass


@contextlib.contextmanager
def previous_pass(dataset, workers: int, pin: bool = False):
    """One pass as the previous loader made it: a new DataLoader whose workers are forked from the
    rank for this pass alone, each batch a new shared-memory segment (and a pinned copy on CUDA)."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin,
                        prefetch_factor=4 if workers else None,
                        multiprocessing_context="fork" if workers else None)
    it = iter(loader)
    try:
        yield it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
