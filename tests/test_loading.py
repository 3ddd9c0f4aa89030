"""The rank's loader workers: persistent across passes, started from the forkserver (never forked
from the rank), batches in reused slots, every wait bounded; and a stress test of worker starts
beside a rank's running threads."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from multiprocessing import forkserver

import pytest
import torch

from dist_lc.data import ShardStream, eval_loader, train_loader
from dist_lc.loading import SLOTS, Loader, LoaderError
from shard_tools.manifest import load_manifest

from torchrun_util import REPO, torchrun


def copied(batch: dict) -> dict:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in batch.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def worker_pids(loader: Loader) -> list[int]:
    return [w.pid for w in loader._iterator._workers]


def process_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command's name: state, parent pid, ..."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def test_persistent_workers_give_each_epoch_the_batches_of_fresh_ones(packed_sample):
    """Three epochs through one loader's workers = three epochs each through a new loader: the same
    tiles, pixels, crops, views and order; the workers stay the same processes and are not the
    rank's children (they come from the forkserver)."""
    manifest = load_manifest(packed_sample)
    args = dict(seed=3, world=2, rank=1, micro=4, accum=2, workers=2, crop=32, shuffle_buffer=8)
    persistent, steps = train_loader(manifest, [1, 2, 3, 4], **args)
    with persistent:
        got, pids = [], []
        for epoch in range(3):
            with persistent.batches(epoch) as batches:
                got.append([copied(b) for b in batches])
                pids.append(worker_pids(persistent))
        assert pids[0] == pids[1] == pids[2]
        assert all(process_stat(pid)[1] != str(os.getpid()) for pid in pids[0])
    for epoch in range(3):
        fresh, _ = train_loader(manifest, [1, 2, 3, 4], epoch=epoch, **args)
        with fresh:
            expected = [copied(b) for b in fresh]
        assert len(expected) == steps * 2 == len(got[epoch])
        assert all(same(a, b) for a, b in zip(got[epoch], expected)), f"epoch {epoch} differs"
    assert [b["key"] for b in got[0]] != [b["key"] for b in got[1]]   # the epoch reached the workers


def test_batches_arrive_in_the_ring_and_a_consumer_may_keep_the_previous_one(packed_sample):
    """Full tiles fill the workers' slots (no new shared-memory segment per batch); a batch held
    while the next one is taken is not overwritten under the consumer's hands."""
    loader = eval_loader(load_manifest(packed_sample), "train", None, world=1, rank=0, batch_size=8, workers=2)
    ring = loader.ring
    lo, hi = ring.image.data_ptr(), ring.image.data_ptr() + ring.image.numel() * 2
    with loader, loader.batches() as batches:
        previous = kept = None
        count = 0
        for batch in batches:
            assert lo <= batch["image"].data_ptr() < hi
            if previous is not None:
                assert same(previous, kept), f"batch {count - 1} changed while it was held"
            previous, kept = batch, copied(batch)
            count += 1
    assert count == 2 * -(-150 // 8) > 3 * SLOTS   # 2 workers × 150 tiles: every slot used several times


def test_a_stuck_worker_ends_the_pass_within_the_limit_and_is_ended(tmp_path):
    """A worker blocked in a read that never returns (a FIFO nobody writes): the rank gets one line
    naming itself and the limit after ``timeout_s``, and the worker does not outlive the loader."""
    fifo = tmp_path / "stuck.tar"
    os.mkfifo(fifo)
    loader = Loader(ShardStream([(str(fifo), 4)], 0, 4, 2, train=True), 1, rank=3, timeout_s=2)
    started = time.monotonic()
    with pytest.raises(LoaderError, match=r"^rank 3: no batch from its 1 data loader worker\(s\) in 2 s "
                                            r"\(data.wait_timeout_s\)"):
        with loader.batches(0) as batches:
            next(batches)
    assert time.monotonic() - started < 15
    assert loader._loader is None   # the pass was left early: its workers were ended (killed: stuck)


def test_a_worker_that_dies_ends_the_pass_at_once(packed_sample):
    """A worker killed mid-pass (the OOM killer) is found within seconds, not after the limit: the
    forkserver's children send no SIGCHLD to the rank, so torch's own check would not see it."""
    loader = eval_loader(load_manifest(packed_sample), "train", None, world=1, rank=0, batch_size=4, workers=1,
                         timeout_s=300)
    started = time.monotonic()
    with pytest.raises(LoaderError, match=r"^rank 0: a data loader worker died \(DataLoader worker \(pid"):
        with loader, loader.batches() as batches:
            next(batches)
            os.kill(worker_pids(loader)[0], 9)
            for _ in batches:
                pass
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_hundreds_of_worker_starts_beside_a_ranks_threads_never_hang(packed_sample, tmp_path):
    """The deadlock this design removes needed a fork while another thread of the rank held a lock:
    2 gloo ranks, each with a thread that keeps all-reducing and allocating, start and end their
    training and validation loaders' workers 50 times over (400 worker starts in all)."""
    proc = torchrun(["tests/workers/loader_stress.py", str(packed_sample), "50"], timeout=600)
    assert "rank 0: 200 worker starts" in proc.stdout and "rank 1: 200 worker starts" in proc.stdout, proc.stdout


def test_a_worker_that_died_between_passes_ends_the_next_pass_at_once(packed_sample):
    """Persistent workers wait between passes (during validation, say): one the OOM killer ended then
    is named when the next pass starts, not after data.wait_timeout_s, and in one line; also when the
    pass starts before the forkserver has reaped it (the forkserver is held stopped until then)."""
    loader = eval_loader(load_manifest(packed_sample), "train", None, world=1, rank=0, batch_size=4, workers=1,
                         timeout_s=60)
    with loader:
        with loader.batches() as batches:
            for _ in batches:
                pass
        pid = worker_pids(loader)[0]
        server = forkserver._forkserver._forkserver_pid
        assert int(process_stat(pid)[1]) == server
        os.kill(server, signal.SIGSTOP)
        wake = threading.Timer(0.5, os.kill, (server, signal.SIGCONT))
        try:
            os.kill(pid, 9)
            deadline = time.monotonic() + 10
            while process_stat(pid)[0] != "Z" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert process_stat(pid)[0] == "Z"   # dead, and the stopped forkserver cannot reap it
            wake.start()
            started = time.monotonic()
            with pytest.raises(LoaderError, match=rf"^rank 0: a data loader worker died \(DataLoader worker "
                                                  rf"\(pid {pid}\) exited between passes, killed by signal 9\)$"):
                with loader.batches():
                    pass
            assert time.monotonic() - started < 30
        finally:
            wake.cancel()
            os.kill(server, signal.SIGCONT)
            if wake.ident is not None:
                wake.join()
        with loader.batches() as batches:   # the next pass starts new workers
            assert sum(1 for _ in batches) > 0


def _can_mount_a_small_shm() -> bool:
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                          capture_output=True).returncode == 0 if shutil.which("unshare") else False


@pytest.mark.skipif(not _can_mount_a_small_shm(), reason="needs unshare -m and mount (root)")
def test_a_batch_ring_that_shared_memory_cannot_hold_is_one_line_naming_the_workers(tiny_shards, tmp_path):
    """A container's /dev/shm (64 MB unless given more) too small for the ring: one line with what it
    needs and what to change, exit 1; not torch's traceback. Run under a 16 MB /dev/shm of its own."""
    train = (f"exec {sys.executable} -m dist_lc train --config configs/smoke.yaml --run-dir {tmp_path / 'run'} "
             f"--set data.shards={tiny_shards} --set data.workers=2 --set train.batch_size=16 "
             "--set train.micro_batch_size=16 --set data.crop=null")
    run = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=16m tmpfs /dev/shm && {train}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr[-2000:]
    assert lines[0].startswith("error: rank 0: no room in /dev/shm (0.02 GiB, ") and \
        "free now) for a loader's batch ring of 0.07 GiB (2 workers × 4 slots × 16 tiles of 256²; " in lines[0] and \
        "use fewer loader workers (data.workers" in lines[0], lines[0]
