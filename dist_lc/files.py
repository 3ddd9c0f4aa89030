"""Output files written whole or not at all (a temporary name in the same folder, then a rename)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from shard_tools.errors import InputError
from shard_tools.manifest import current_umask, write_json_atomic

__all__ = ["write_csv_atomic", "write_json_atomic", "check_parent"]


def check_parent(path, what: str = "output") -> Path:
    """``path`` as a Path whose folder exists (checked before any work is done)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path}: {what} folder {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder, not a file name")
    return path


def write_csv_atomic(table: pd.DataFrame, path) -> None:
    path = check_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~current_umask())   # mkstemp makes 0600; others sharing the folder must read it
    os.close(fd)
    try:
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
