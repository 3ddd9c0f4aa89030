"""Output files written whole or not at all: a temporary name in the same folder, fsync, rename,
fsync of the folder.

Every writer takes ``(path, content)`` in that order. A failing write (no space, a quota, a
read-only or vanished folder) raises :class:`~lc_common.errors.WriteError` naming ``path`` and
leaves the previous file, if any, untouched.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO

from .errors import InputError, WriteError

__all__ = ["check_parent", "current_umask", "fsync_dir", "fsync_path", "write_atomic", "write_bytes_atomic",
           "write_csv_atomic", "write_json_atomic"]


def current_umask() -> int:
    """The process's umask, read without setting it where Linux shows it: setting it, even back,
    would race with other threads creating files."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path) -> None:
    """Make a closed file's data durable (for a file another library wrote and closed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder) -> None:
    """Make the renames and deletions in ``folder`` durable: fsync of a file keeps its data, not its
    name. File systems that cannot fsync a folder (some network ones) are left to their own order."""
    try:
        fsync_path(folder)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


def check_parent(path, what: str = "output") -> Path:
    """``path`` as a Path whose folder exists (checked before any work is done)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: {what} folder {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder, not a file name")
    return path


def write_atomic(path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, fsync, rename over ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; others sharing the folder must read it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    except RuntimeError as exc:
        # torch.save reports a failed write as RuntimeError ("unexpected pos …"); its OSError cause
        # (or the file system's state) says why.
        cause = exc.__context__ if isinstance(exc.__context__, OSError) else None
        if cause is None:
            raise
        raise WriteError(path, cause) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_bytes_atomic(path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_json_atomic(path, obj) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=1).encode())


def write_csv_atomic(path, table) -> None:
    """A pandas DataFrame as CSV, without its index (callers reset it where it carries data)."""
    write_bytes_atomic(path, table.to_csv(index=False).encode())
