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
    (Lustre or NFS mounted without them: ENOLCK, ENOSYS, EOPNOTSUPP) runs unguarded; a lock that
    cannot be opened (a read-only folder) is an InputError naming it."""
    try:
        lock = open(Path(path), "a+")
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
            lock.seek(0)
            lock.truncate()
            lock.write(f"pid {os.getpid()}")
            lock.flush()
        yield


@contextlib.contextmanager
def folder_held(folder, refused: str):
    """Hold the lock of ``folder`` itself (an existing folder) while the block runs, leaving no file
    in it (an output folder holds only what its tool writes). Another process holding it is an
    InputError, ``refused``; a filesystem without locks runs unguarded."""
    try:
        fd = os.open(Path(folder), os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise InputError(f"{folder}: cannot open the folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in HELD:
                raise InputError(refused) from None
        yield
    finally:
        os.close(fd)   # closing drops the lock
