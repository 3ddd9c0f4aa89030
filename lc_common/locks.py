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
def held(path, refused: str):
    """Hold the lock on ``path`` (created) while the block runs. Another process holding it is an
    InputError, ``refused`` formatted with ``holder`` (the holder's pid). A filesystem without locks
    (Lustre or NFS mounted without them: ENOLCK, ENOSYS, EOPNOTSUPP) runs unguarded."""
    with open(Path(path), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in HELD:
                lock.seek(0)
                raise InputError(refused.format(holder=lock.read().strip() or "?")) from None
        else:
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()}")
            lock.flush()
        yield
