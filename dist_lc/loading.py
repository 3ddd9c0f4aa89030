"""A rank's loader workers: started once, never forked from the rank, batches passed in reused slots,
every wait bounded.

Three choices, each against a failure seen in practice:

* **No fork of a threaded rank.** A rank runs threads (gloo's or NCCL's, torchrun's parent watch,
  queue feeders, TensorBoard's writer); a ``fork()`` while one of them holds a lock leaves the child
  blocked on that lock forever. Workers are therefore forked from a *forkserver*: a process that
  the rank starts once by fork+exec (no Python runs between the two) and that runs nothing but its
  accept loop, with this package preloaded so that a worker starts in milliseconds.
* **Workers persist.** A loader's workers start at its first pass and serve every later one
  (training epochs, validations), so a run starts ``workers`` processes per loader, not per epoch.
  The dataset reads the epoch from shared memory at the start of each pass
  (:meth:`dist_lc.data.ShardStream.set_epoch`), so the epoch plan is unchanged.
* **Batches cross in reused slots.** The rank allocates :class:`BatchRing` once: ``SLOTS`` batch
  buffers per worker in shared memory (page-locked on CUDA, so the copy to the device is a direct,
  asynchronous DMA). A worker writes a batch into its next slot and sends only the slot's number;
  the rank releases a slot when the consumer has moved on (:class:`Batches`). A fresh shared-memory
  segment per batch, as torch does by default, made both sides fault every page in again.

Every wait is bounded: a rank that gets no batch from its workers within ``timeout_s``, or one of
whose workers died, raises :class:`LoaderError` naming itself, which the trainer records as the
run's cause.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import functools
import os
import signal
import sys
import time
import weakref
from multiprocessing import forkserver, popen_forkserver, spawn
from multiprocessing.context import ForkServerContext, ForkServerProcess

import numpy as np
import torch
from torch.utils.data import DataLoader

from lc_common.errors import said

PREFETCH = 2          # batches each worker may be asked for ahead (torch's prefetch_factor)
SLOTS = PREFETCH + 2  # ring slots per worker: what it may have in flight, plus the consumer's two
HELD = 1              # earlier batches the consumer may still be using when it asks for the next
POLL_S = (1e-4, 4e-3)  # a worker's wait between two looks at a slot it needs back: first, longest
CHECK_S = 5.0         # the rank looks at its workers' health at least this often while it waits
BOOT_MODULE = "dist_lc.worker_boot"   # what the forkserver imports before it forks any worker
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LoaderError(RuntimeError):
    """A rank's loader workers gave no batch within its limit, or one of them died."""


class RingClosed(Exception):
    """The rank is shutting the workers down while one waits for a slot."""


class _WorkerPopen(popen_forkserver.Popen):
    """Starts a worker through the forkserver without the parent's ``__main__``: spawn's preparation
    would run the user's script (or module) again in every worker, which needs the script's
    ``if __name__ == "__main__"`` guard and costs an import; a worker needs only this package."""

    def _launch(self, process_obj):
        real = spawn.get_preparation_data

        def without_main(name):
            data = real(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        spawn.get_preparation_data = without_main
        try:
            super()._launch(process_obj)
        finally:
            spawn.get_preparation_data = real


class _WorkerProcess(ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _WorkerPopen(process_obj)

    def terminate(self) -> None:
        """Kill: a worker ignores SIGTERM (a job's stop signal is its rank's to handle), so whoever
        terminates one means it — torch's shutdown once a worker did not join in time (it would
        otherwise wait another 5 s for nothing), multiprocessing's exit handler."""
        self.kill()


class _WorkerContext(ForkServerContext):
    Process = _WorkerProcess


_CONTEXT = _WorkerContext()


def worker_context() -> ForkServerContext:
    """The start method of every loader worker: forkserver, with the data path preloaded."""
    _CONTEXT.set_forkserver_preload([BOOT_MODULE])
    return _CONTEXT


def ignore_stop_signals() -> None:
    """Slurm signals every process of a job step: loader workers leave stopping to their rank."""
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def init_worker(worker_id: int) -> None:
    """A worker lives no longer than its rank. The forkserver exits when its rank does, unless a
    child still holds the end of the pipe that tells it so (Python hands it to every child), and a
    worker's own check only looks at its parent, the forkserver: so the worker closes that pipe end
    and asks the kernel for SIGKILL when the forkserver goes."""
    ignore_stop_signals()
    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    boot = sys.modules.get(BOOT_MODULE)   # preloaded by the forkserver: its pid is the parent to watch
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if boot is not None and os.getppid() != boot.FORKSERVER_PID:   # it went before the request took effect
        os._exit(1)


def as_sent(batch):
    """A batch as its worker made it. torch's default for unbatched loading turns numpy arrays into
    tensors, each of which would then cross in a shared-memory segment of its own."""
    return batch


class BatchRing:
    """``SLOTS`` batch buffers per worker in shared memory, allocated by the rank, written by the
    workers in turn: worker ``w`` writes its ``seq``-th batch into slot ``seq % SLOTS`` once the rank
    has released the batch that used it last. Released counts only grow, one per batch, in order."""

    def __init__(self, workers: int, batch: int, size: int, masks: bool):
        self.workers, self.batch, self.size = workers, batch, size
        self.image = torch.empty((workers, SLOTS, batch, size, size, 4), dtype=torch.uint16).share_memory_()
        self.mask = (torch.empty((workers, SLOTS, batch, size, size), dtype=torch.uint8).share_memory_()
                     if masks else None)
        self.control = torch.zeros(workers + 1, dtype=torch.int64).share_memory_()  # released per worker; closing
        self.generation = 0   # the rank's count of resets: a release from before one is void
        self._pinned: list = []

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_pinned", "_np", "_unpin")}

    @property
    def counters(self) -> np.ndarray:
        """The control words as numpy (reading a tensor element from Python costs microseconds)."""
        if "_np" not in self.__dict__:
            self._np = self.control.numpy()
        return self._np

    def fits(self, rows: int, height: int, width: int) -> bool:
        return rows <= self.batch and height == width == self.size

    # -- worker side
    def claim(self, worker: int, seq: int):
        """(image, mask) buffers of the slot for the worker's ``seq``-th batch, once free."""
        counters, pause = self.counters, POLL_S[0]
        while counters[worker] < seq - SLOTS + 1:   # a worker this far ahead can afford to wait longer
            if counters[self.workers]:
                raise RingClosed
            time.sleep(pause)
            pause = min(2 * pause, POLL_S[1])
        slot = seq % SLOTS
        return self.image[worker, slot], (self.mask[worker, slot] if self.mask is not None else None)

    # -- rank side
    def view(self, worker: int, seq: int, rows: int):
        slot = seq % SLOTS
        return self.image[worker, slot, :rows], (self.mask[worker, slot, :rows] if self.mask is not None else None)

    def release(self, worker: int, seq: int, generation: int) -> None:
        if generation == self.generation:
            self.counters[worker] = seq + 1

    def close(self) -> None:
        """Tell waiting workers to give up; then the counts start again for new workers."""
        self.counters[self.workers] = 1

    def reset(self) -> None:
        self.counters[:] = 0
        self.generation += 1

    def pin(self) -> bool:
        """Page-lock the slots for CUDA, in place (the workers keep writing the same memory); False
        if CUDA refused (the copies to the device are then synchronous, from pageable memory)."""
        cudart = torch.cuda.cudart()
        for t in (self.image, self.mask):
            if t is None or t.is_pinned():
                continue
            if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) != 0:
                take_cuda_error()   # else the trainer's next kernel launch would raise the refusal
                self.unpin()
                return False
            self._pinned.append(t.data_ptr())
        self._unpin = weakref.finalize(self, _unregister, self._pinned)
        return True

    def unpin(self) -> None:
        _unregister(self._pinned)


def _unregister(pointers: list) -> None:
    cudart = torch.cuda.cudart()
    while pointers:
        cudart.cudaHostUnregister(pointers.pop())


def take_cuda_error() -> str | None:
    """Reset the CUDA runtime's last error, which a refused ``cudaHostRegister`` leaves set: torch
    reads it (``cudaGetLastError``) after its next kernel launch and raises it there. torch's cudart
    bindings do not offer that call, so a kernel launched here takes the error instead; returns the
    error's first line (None: there was none)."""
    try:
        torch.ones(1, device="cuda")   # a fill kernel, then torch's launch check
        torch.cuda.synchronize()
    except RuntimeError as exc:   # the refusal, now reported and reset
        return said(exc)
    return None


def _ring(workers: int, batch: int, size: int, masks: bool, rank: int) -> BatchRing:
    """The rank's BatchRing, or a LoaderError saying what it needs where shared memory is short (a
    container's /dev/shm is 64 MB unless it was given more)."""
    try:
        return BatchRing(workers, batch, size, masks)
    except RuntimeError as exc:
        if "unable to allocate shared memory" not in str(exc):   # not the room: too many open files, rights
            raise
    # out of the handler, whose exception held the half-built ring: the room said is the room there is
    need = workers * SLOTS * batch * size * size * (4 * 2 + (1 if masks else 0))
    try:
        shm = os.statvfs("/dev/shm")
        room = f"{shm.f_blocks * shm.f_frsize / 2**30:.2f} GiB, {shm.f_bavail * shm.f_frsize / 2**30:.2f} free now"
    except OSError:
        room = "not there"
    raise LoaderError(f"rank {rank}: no room in /dev/shm ({room}) for a loader's batch ring of {need / 2**30:.2f} "
                      f"GiB ({workers} workers × {SLOTS} slots × {batch} tiles of {size}²; each rank on a node "
                      "holds one per loader, training and validation): use fewer loader workers (data.workers, "
                      "or predict's --workers) or a smaller batch, or give the container more shared memory "
                      "(docker run --shm-size)")


class Batches:
    """The rank's side of a pass: batches as tensors (slot views resolved), each wait bounded, each
    slot released once the consumer has asked for ``HELD`` + 1 later batches (and, on CUDA, once the
    work queued while it was current has run: the asynchronous copy to the device)."""

    def __init__(self, it, ring: BatchRing | None, describe_wait, cuda: bool, timeout_s: float):
        self._it, self._ring, self._describe_wait, self._cuda = it, ring, describe_wait, cuda
        self._timeout_s, self._generation = timeout_s, ring.generation if ring is not None else 0
        self._held: collections.deque = collections.deque()   # (worker, seq, event)
        self.exhausted = False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._held and self._cuda:
            worker, seq, _ = self._held[-1]
            event = torch.cuda.Event()
            event.record()
            self._held[-1] = (worker, seq, event)
        while len(self._held) > HELD:
            self._release(*self._held.popleft())
        return self._resolve(self._next_bounded())

    def _next_bounded(self) -> dict:
        """The next batch, looking at the workers every CHECK_S (torch's wait, which raises before it
        changes any state, also finds a dead worker there) and giving up after ``timeout_s``."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                return next(self._it)
            except StopIteration:
                self.exhausted = True
                raise
            except RuntimeError as exc:
                text = str(exc)
                if "exited unexpectedly" in text or "killed by signal" in text:
                    raise LoaderError(self._describe_wait(died=text)) from None
                if not text.startswith("DataLoader timed out") or time.monotonic() >= deadline:
                    if text.startswith("DataLoader timed out"):
                        raise LoaderError(self._describe_wait()) from None
                    raise

    def _resolve(self, batch: dict) -> dict:
        ref = batch.pop("ring", None)
        if ref is not None:
            worker, seq, rows = ref
            batch["image"], mask = self._ring.view(worker, seq, rows)
            if "props" in batch:
                batch["mask"] = mask
            self._held.append((worker, seq, None))
        for name in ("props", "views"):
            if isinstance(batch.get(name), np.ndarray):
                batch[name] = torch.from_numpy(batch[name])
        return batch

    def _release(self, worker: int, seq: int, event) -> None:
        if event is not None:
            event.synchronize()
        self._ring.release(worker, seq, self._generation)

    def release_all(self) -> None:
        if self._cuda and self._held:
            torch.cuda.current_stream().synchronize()
        while self._held:
            worker, seq, _ = self._held.popleft()
            self._ring.release(worker, seq, self._generation)


def _exited(worker) -> bool:
    """Whether a worker process has ended. ``is_alive`` hears it from the forkserver, which reaps its
    children only when it next runs: a worker killed a moment ago still looks alive there, so where
    /proc shows this pid namespace its state is read there too (Z: ended, not yet reaped)."""
    if not worker.is_alive():
        return True
    if not _proc_is_ours():
        return False
    try:
        with open(f"/proc/{worker.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):   # reaped since is_alive looked
        return True
    except (OSError, IndexError):   # unreadable: is_alive's word stands
        return False


def _how_it_ended(code: int | None) -> str:
    if code is None:   # not yet reaped after the wait
        return ""
    return f", killed by signal {-code}" if code < 0 else f", exit code {code}"


@functools.cache
def _proc_is_ours() -> bool:
    """Linux with a /proc of this process's pid namespace (a sandbox may mount another one)."""
    try:
        return sys.platform.startswith("linux") and os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


_OPEN: "weakref.WeakSet[Loader]" = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    """Workers ignore SIGTERM, which is all that multiprocessing's own exit handler sends them before
    it waits for them: a loader left open (an error escaped its owner) must end its workers first.
    Registered after multiprocessing's handler, so it runs before it."""
    for loader in list(_OPEN):
        with contextlib.suppress(Exception):
            loader.close()


class Loader:
    """One rank's loader over a dataset (:class:`dist_lc.data.ShardStream` or ``TiffStream``).

    ``workers`` processes start at the first pass and serve every later one until :meth:`close`;
    ``with loader.batches(epoch) as it`` is one pass. A pass left before its end (an error, a stop
    request) ends the workers, and the next pass starts new ones. Iterating the loader itself is one
    whole pass.

    ``listed``: (tiles, digest) of every rank's share together, as this rank listed them (a prediction
    pass's: the ranks compare it, as nodes can see different copies of a folder)."""

    def __init__(self, dataset, workers: int, *, rank: int = 0, timeout_s: float = 300.0,
                 device: torch.device | None = None, listed: tuple[int, str] | None = None):
        self.dataset, self.workers, self.rank, self.timeout_s = dataset, workers, rank, timeout_s
        self.listed = listed
        self.cuda = device is not None and device.type == "cuda"
        self.ring = None
        if workers:
            batch, size, masks = dataset.batch_shape()
            self.ring = _ring(workers, batch, size, masks, rank)
            dataset.ring = self.ring
            if self.cuda and not self.ring.pin():
                print(f"warning: rank {rank}: CUDA could not page-lock the loader's "
                      f"{self.ring.image.nbytes / 2**30:.1f} GiB batch ring; batches are copied to the GPU "
                      "from pageable memory (fewer data.workers or a smaller micro-batch need less)",
                      file=sys.stderr, flush=True)
        self._loader: DataLoader | None = None
        self._iterator = None
        _OPEN.add(self)

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            w = self.workers
            self._loader = DataLoader(
                self.dataset, batch_size=None, num_workers=w, pin_memory=False,
                prefetch_factor=PREFETCH if w else None, persistent_workers=bool(w), collate_fn=as_sent,
                worker_init_fn=init_worker if w else None,
                multiprocessing_context=worker_context() if w else None,
                timeout=min(CHECK_S, self.timeout_s) if w else 0)
        return self._loader

    def _describe_wait(self, died: str | None = None) -> str:
        if died:
            return f"rank {self.rank}: a data loader worker died ({said(died)})"
        return (f"rank {self.rank}: no batch from its {self.workers} data loader worker(s) in "
                f"{self.timeout_s:g} s (data.wait_timeout_s): a worker is stuck or far too slow")

    @contextlib.contextmanager
    def batches(self, epoch: int | None = None):
        if epoch is not None:
            self.dataset.set_epoch(epoch)
        self.dataset.check()
        batches = None
        try:
            it = self._start_pass()
            batches = Batches(it, self.ring, self._describe_wait, self.cuda, self.timeout_s)
            yield batches
        finally:
            if batches is not None and self.ring is not None:
                batches.release_all()
            if batches is None or not batches.exhausted:
                self._stop_workers()   # left early: the next pass starts new workers

    def _start_pass(self):
        """The DataLoader's iterator for a new pass. Persistent workers confirm a new pass before
        it starts (torch waits for each with the iterator's own timeout, which cannot be resumed
        midway): that wait gets the whole limit, the batches then CHECK_S at a time."""
        loader = self._dataloader()
        previous = getattr(loader, "_iterator", None)
        if previous is not None:
            previous._timeout = self.timeout_s
            dead = [w for w in getattr(previous, "_workers", ()) if _exited(w)]
            if dead:   # between passes (the OOM killer during validation): torch would wait the whole limit
                dead[0].join(timeout=CHECK_S)   # its exit status comes once the forkserver has reaped it
                code = dead[0].exitcode
                self._stop_workers()
                raise LoaderError(self._describe_wait(
                    f"DataLoader worker (pid {dead[0].pid}) exited between passes{_how_it_ended(code)}"))
        try:
            it = iter(loader)
        except RuntimeError as exc:
            if str(exc).startswith("DataLoader timed out"):
                raise LoaderError(self._describe_wait()) from None
            if "exited unexpectedly" in str(exc):   # one that died while the pass was being started
                raise LoaderError(self._describe_wait(str(exc))) from None
            raise
        if self.workers:
            it._timeout = min(CHECK_S, self.timeout_s)
        self._iterator = it if self.workers else None
        return it

    def __iter__(self):
        with self.batches() as batches:
            yield from batches

    def _stop_workers(self) -> None:
        """End the workers (they ignore SIGTERM, so they must be told): left to the garbage
        collector, an iterator kept alive by an exception's traceback survives until interpreter
        exit, where multiprocessing terminates its workers and then waits for them forever.

        Live workers are asked first (torch's own shutdown, a few seconds each) and killed if still
        there; never killed first, as one killed inside the done event's lock, which the rank's
        shutdown then takes, would hang the rank. If one is already dead, it may have died holding
        that lock: nothing shared is touched, the others are killed."""
        it = self._iterator if self._iterator is not None else getattr(self._loader, "_iterator", None)
        self._iterator, self._loader = None, None
        if it is None:
            return
        if self.ring is not None:
            self.ring.close()
        workers = list(getattr(it, "_workers", ()))
        if any(_exited(w) for w in workers):
            it._shutdown = True   # torch's clean-up (also at garbage collection) would take that lock
            for queue in [*getattr(it, "_index_queues", ()), getattr(it, "_worker_result_queue", None)]:
                if queue is not None:
                    queue.cancel_join_thread()   # nor may exit wait for a feeder writing to the dead
        elif hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()   # asks each worker to stop, waits, then terminates (kills) it
        for worker in workers:
            if worker.is_alive():   # (after a dead one, above: the others, which nothing asked)
                worker.kill()
            worker.join(timeout=5)
        if self.ring is not None:
            self.ring.reset()

    def close(self) -> None:
        self._stop_workers()
        if self.ring is not None and self.cuda:
            self.ring.unpin()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
