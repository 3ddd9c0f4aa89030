"""One process at a time on a folder: an exclusive ``flock`` on a file in it. The kernel drops the
lock of a process that dies (SIGKILL, the OOM killer), so a stale lock file is simply taken over."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import InputError

HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@contextlib.contextmanager
def held(path, refused: str, transient: bool = False):
    """Hold the lock on ``path`` (created) while the block runs. Another process holding it is an
    InputError, ``refused`` with ``{holder}`` replaced by the holder's pid, host and start. A filesystem without locks
    (Lustre or NFS mounted without them: ENOLCK, ENOSYS, EOPNOTSUPP) runs unguarded; a lock that
    cannot be opened (a read-only folder) is an InputError naming it. ``transient``: the lock file is
    removed when the block ends (an output folder keeps only its outputs; a killed holder's is taken
    over, then removed).

    A regular file opened for writing, not the folder itself: NFS and Lustre lock those on the server,
    so the lock holds between nodes (a folder's flock would be local to each node)."""
    path = Path(path)
    lock, acquired = _take(path, refused)
    with lock:
        try:
            yield
        finally:
            if transient and acquired:
                with contextlib.suppress(OSError):
                    path.unlink()   # before the lock goes: whoever waits for it then takes a new file (_take)


PROBE_WAIT_S = 0.5   # far longer than holder() keeps a free lock, far shorter than any real holder
TAKE_ATTEMPTS = 10   # files at the path taken in turn, each removed by a transient holder meanwhile


def _take(path: Path, refused: str):
    """(the lock file, open; whether this process holds it: not on a filesystem without locks).

    A busy lock is tried again for :data:`PROBE_WAIT_S`: :func:`holder` takes a free lock for a
    moment to tell it is free, and a run starting in that moment must not be refused. A lock taken
    on a file that is no longer at ``path`` (its transient holder removed it, then let it go) is
    let go, and the file now at ``path`` taken instead: two processes never hold the same folder."""
    said = "?"   # what the last holder wrote, for a refusal
    for attempt in range(TAKE_ATTEMPTS):
        try:
            lock = open(path, "a+", errors="replace")
        except OSError as exc:
            if attempt and isinstance(exc, FileNotFoundError):   # the holder waited for took its folder away
                raise InputError(f"{path.parent}: removed by the run this one waited for ({said}) as it ended; "
                                 "start again") from None
            raise InputError(f"{path}: cannot open the lock ({exc.strerror or exc})") from None
        try:
            lock.seek(0)
            said = lock.read().strip() or said
            try:
                _lock_now_or_soon(lock)
            except OSError as exc:
                if exc.errno not in HELD:
                    return lock, False   # a filesystem without locks: unguarded
                lock.seek(0)
                raise InputError(refused.replace("{holder}", lock.read().strip() or said)) from None
            if _still_at(lock, path):
                lock.seek(0)
                lock.truncate()
                lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
                lock.flush()
                return lock, True
        except BaseException:
            lock.close()
            raise
        lock.close()
    raise InputError(refused.replace("{holder}", said))   # replaced each time it was taken: runs keep starting there


def _lock_now_or_soon(lock) -> None:
    """``flock``, tried again for :data:`PROBE_WAIT_S` while another process holds it (see :func:`_take`).
    Once it was busy, another error (a transient ENOLCK of an NFS server) counts as busy too: only a
    first try tells a filesystem without locks."""
    deadline, busy = time.monotonic() + PROBE_WAIT_S, False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            busy = busy or exc.errno in HELD
            if not busy:
                raise
            if time.monotonic() > deadline:
                raise BlockingIOError(errno.EWOULDBLOCK, os.strerror(errno.EWOULDBLOCK)) from exc
        time.sleep(0.02)


def _still_at(lock, path: Path) -> bool:
    """Whether the open ``lock`` is the file at ``path`` (not one removed since it was opened)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise InputError(f"{path}: cannot check the lock ({exc.strerror or exc})") from None
    mine = os.fstat(lock.fileno())
    return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def holder(path) -> str | None:
    """Who holds the lock on ``path`` (as :func:`held` names it), or None: nobody, no such file, or a
    filesystem without locks (nothing can be told there). Takes the lock for a moment when it is free."""
    try:
        lock = open(path, "r+", errors="replace")
    except OSError:
        return None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            return (lock.read().strip() or "?") if exc.errno in HELD else None
        fcntl.flock(lock, fcntl.LOCK_UN)
    return None


@contextlib.contextmanager
def claimed(folder, refused: str, lock_name: str, what: str = "--out", transient: bool = True):
    """``folder`` made if missing, and held through ``folder/lock_name`` while the block runs (see
    :func:`held`). When the block fails, a folder this call made goes again if nothing but its lock
    is in it, and so do the empty parents it made: a refused or failed run leaves the file system as
    it found it. ``what`` names the folder's option in the error when it cannot be created."""
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]   # the deepest first
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{folder}: {what} cannot be created ({exc.strerror or exc})") from None
        with held(folder / lock_name, refused, transient):
            try:
                yield folder
            except BaseException:
                if made and not transient and os.listdir(folder) == [lock_name]:
                    (folder / lock_name).unlink(missing_ok=True)   # still held: no other run took it meanwhile
                raise
    except BaseException:
        for path in made:
            if not os.path.lexists(path):   # the mkdir failed above it
                continue
            try:
                path.rmdir()   # only when empty
            except OSError:
                break
        raise
