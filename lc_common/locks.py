"""One process at a time on a folder: an exclusive ``flock`` on a file in it. The kernel drops the
lock of a process that dies (SIGKILL, the OOM killer), so a stale lock file is simply taken over."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from .errors import InputError

HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


@contextlib.contextmanager
def held(path, refused: str, transient: bool = False):
    """Hold the lock on ``path`` (created) while the block runs. Another process holding it is an
    InputError, ``refused`` formatted with ``holder`` (the holder's pid). A filesystem without locks
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
            lock.write(f"pid {os.getpid()}")
            lock.flush()
        try:
            yield
        finally:
            if transient and acquired:
                with contextlib.suppress(OSError):
                    path.unlink()   # still held: a process that opened it meanwhile is refused
