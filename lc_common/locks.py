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
    InputError, ``refused`` formatted with ``holder`` (the holder's pid, host and start). A filesystem without locks
    (Lustre or NFS mounted without them: ENOLCK, ENOSYS, EOPNOTSUPP) runs unguarded; a lock that
    cannot be opened (a read-only folder) is an InputError naming it. ``transient``: the lock file is
    removed when the block ends (an output folder keeps only its outputs; a killed holder's is taken
    over, then removed).

    A regular file opened for writing, not the folder itself: NFS and Lustre lock those on the server,
    so the lock holds between nodes (a folder's flock would be local to each node)."""
    path, acquired = Path(path), False
    try:
        lock = open(path, "a+")
    except OSError as exc:
        raise InputError(f"{path}: cannot open the lock ({exc.strerror or exc})") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in HELD:
                lock.seek(0)
                raise InputError(refused.format(holder=lock.read().strip() or "?")) from None
        else:
            acquired = True
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            lock.flush()
        try:
            yield
        finally:
            if transient and acquired:
                with contextlib.suppress(OSError):
                    path.unlink()   # still held: a process that opened it meanwhile is refused


def holder(path) -> str | None:
    """Who holds the lock on ``path`` (as :func:`held` names it), or None: nobody, no such file, or a
    filesystem without locks (nothing can be told there). Takes the lock for a moment when it is free."""
    try:
        lock = open(path, "r+")
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
    is in it: a refused or failed run leaves the file system as it found it. ``what`` names the
    folder's option in the error when it cannot be created."""
    folder = Path(folder)
    made = not os.path.lexists(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{folder}: {what} cannot be created ({exc.strerror or exc})") from None
    try:
        with held(folder / lock_name, refused, transient):
            try:
                yield folder
            except BaseException:
                if made and not transient and os.listdir(folder) == [lock_name]:
                    (folder / lock_name).unlink(missing_ok=True)   # still held: no other run took it meanwhile
                raise
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()   # only when empty
        raise
