"""Reading back the JSON records this tool writes (a CV plan, its jobs, a fold's result, tune
settings): a damaged or foreign file is one InputError line naming it, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_json_object(path, record: str) -> dict:
    """The JSON object in ``path``; InputError naming the file and ``record`` (what it should hold)
    when it cannot be read, is not JSON, or holds something else."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the {record} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable {record} ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: unreadable {record} (ValueError: not a JSON object but {type(data).__name__})")
    return data


def read_record(folder, name: str, kind: str, record: str, build):
    """``build`` of the JSON in ``folder/name``, the record that makes ``folder`` a ``kind`` folder.
    InputError naming the folder when it has none, the file when it is not what ``build`` expects
    (``build`` raises KeyError, TypeError or ValueError); ``build``'s own InputError passes."""
    folder = Path(folder)
    path = folder / name
    if not path.is_file():
        raise InputError(f"{folder}: not a {kind} folder (no {name})")
    data = read_json_object(path, record)
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: unreadable {record} ({type(exc).__name__}: {exc})") from None
