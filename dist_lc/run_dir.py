"""The run folder: its default name, the lock that keeps two trainings out of one folder, and the
failure notes its ranks leave there.

The launchers (``dist-lc cv``, ``dist-lc tune``) read locks and notes here and do not import torch:
the two helpers that only a training calls import :mod:`dist_lc.distributed` when called."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from lc_common.atomic import write_bytes_atomic
from lc_common import locks
from lc_common.errors import InputError, WriteError

LOCK = ".lock"


def default_run_dir(config_path) -> Path:
    """``runs/<recipe>-<launch id>``: the same on every rank and across restarts of one launch,
    different for every launch (see :func:`distributed.launch_id`)."""
    from . import distributed

    return Path("runs") / f"{Path(config_path or 'default').stem}-{distributed.launch_id()}"


def check_output_folder(path: Path, what: str = "--run-dir") -> None:
    """Fail before any work when ``path`` cannot become a folder (a file on the way, no permission)."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{path}: {what} cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {what} cannot be created (no write permission in {probe})")
    if Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"{path}: {what} is a file, not a folder")


class RunLock:
    """``RUN_DIR/.lock`` held by rank 0 while it trains (:func:`lc_common.locks.claimed`).

    A second training on the same folder is refused with one line naming the holder; the kernel
    drops the lock of a process that died (SIGKILL, OOM), so a stale lock file is simply taken over.
    Every rank learns rank 0's outcome, so all of them stop together when the folder is taken.
    The lock is taken before the run's set-up (whose micro-batch trials would share the GPU of the
    training that holds it), so a set-up that refuses its input leaves a folder that the lock alone
    created as it was: not there.
    """

    def __init__(self, run_dir):
        self.run_dir, self._held = Path(run_dir), contextlib.ExitStack()

    def __enter__(self) -> "RunLock":
        from . import distributed

        distributed.on_main(self._acquire)
        return self

    def _acquire(self) -> None:
        refused = f"{self.run_dir}: run folder in use by another training ({{holder}}); wait for it to end or " \
                  "choose another --run-dir"
        # kept after the run: the folder's outputs stay, and a resume takes it over
        self._held.enter_context(locks.claimed(self.run_dir, refused, LOCK, what="--run-dir", transient=False))

    def __exit__(self, *exc) -> bool:
        return self._held.__exit__(*exc)


def trainer_of(run_dir) -> str | None:
    """The training that holds the run folder now ("pid X on HOST since T"), or None."""
    return locks.holder(Path(run_dir) / LOCK)


# ----------------------------------------------------------------------------- failures across ranks

FAILURES = ".failures"


def record_failure(run_dir, rank: int, exc: BaseException) -> None:
    """One line saying why this rank stopped, in the run folder every rank shares, written before the
    process exits: a peer that only sees a closed connection reports the cause instead."""
    folder = Path(run_dir) / FAILURES
    try:
        folder.mkdir(parents=True, exist_ok=True)
        kind = "input" if isinstance(exc, InputError) else getattr(exc, "failure_kind", "error")
        text = " ".join(str(exc).split()) or type(exc).__name__
        # whole or not at all: a peer reads it while this process may be dying
        write_bytes_atomic(folder / f"rank{rank}", f"{time.time():.3f} {kind} {type(exc).__name__}: {text}\n".encode())
    except (OSError, WriteError):
        pass


def first_peer_failure(run_dir, rank: int, wait_s: float = 3.0) -> tuple[int, str, str] | None:
    """(rank, "input" | "diverged" | "error", message) of the other rank whose failure note is the
    first, or None: also None when this rank's own note is the first (two ranks failing as the
    consequence of a third that left none would otherwise each blame the other)."""
    deadline = time.monotonic() + wait_s
    while True:
        notes = failure_notes(run_dir)
        if any(other != rank for _, other, _, _ in notes):
            _, other, kind, message = min(notes)
            return None if other == rank else (other, kind, message)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def failure_notes(run_dir) -> list[tuple[float, int, str, str]]:
    """(time, rank, kind, message) of every failure note in the run folder."""
    folder, notes = Path(run_dir) / FAILURES, []
    for path in folder.glob("rank*") if folder.is_dir() else []:
        try:
            other = int(path.name[4:])
            stamp, kind, message = path.read_text().strip().split(" ", 2)
            notes.append((float(stamp), other, kind, message))
        except (OSError, ValueError):
            # not a note this version wrote whole (an earlier release's torn write, a stray
            # file): it must not hide the real cause behind a parsing error
            continue
    return notes


def diverged(run_dir) -> bool:
    """Whether the run stopped because its loss was no longer finite: the recipe's outcome (a
    learning rate too high), which a search counts as a result rather than a broken job."""
    return any(kind == "diverged" for _, _, kind, _ in failure_notes(run_dir))


def clear_failures(run_dir) -> None:
    folder = Path(run_dir) / FAILURES
    for path in folder.glob("rank*") if folder.is_dir() else []:
        path.unlink(missing_ok=True)
