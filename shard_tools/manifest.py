"""``manifest.json``: the index of a shard folder. Written last and atomically by ``pack``.

Schema (format_version 1)::

    {
      "format_version": 1, "tool_version": "0.1.0", "created": "<iso time>", "source": "<abs path>",
      "class_names": [10 names], "encoding": {"image": "npy", "mask": "npy", "props": "npy"},
      "image_shape": [256, 256, 4], "image_dtype": "uint16", "mask_dtype": "uint8",
      "num_folds": 5, "seed": 0, "block_size": 15,     # train tiles of consecutive ids per fold block
      "counts": {"train": 300, "test": 24},
      "shards": [{"name": "train-f0-000000.tar", "split": "train", "fold": 0,
                  "count": 60, "bytes": 35000000, "sha256": "...", "keys": ["1", "7", ...]}, ...],
                 # test shards have "fold": null
      "folds": {"<sample id>": fold, ...},
      "fold_class_pixels": {"0": [10 ints], ...},      # per-fold pixel counts per class
      "channel_stats": {"mean": [4], "std": [4], "min": [4], "max": [4]}   # over all train pixels
    }

A folder without ``manifest.json`` is incomplete and is refused.

A shard folder is a local path or a URL that webdataset's ``gopen`` reads: ``https://host/shards``,
``file:///data/shards``, or ``pipe:CMD`` where CMD writes the file ``{name}`` to its standard output
(e.g. ``pipe:aws s3 cp s3://bucket/shards/{name} -``).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from lc_common.errors import InputError, one_line
from .format import FORMAT_VERSION
from lc_common.tiles import NUM_CLASSES

MANIFEST_NAME = "manifest.json"
SHARD_NAME_PATTERN = re.compile(r"^(train-f\d+|test)-\d{6}\.tar$")
ENTRY_KEYS = ("name", "split", "fold", "count", "bytes", "sha256", "keys")
REQUIRED_KEYS = ("format_version", "class_names", "num_folds", "shards", "folds",
                 "fold_class_pixels", "channel_stats", "counts")


def shard_name(split: str, fold, index: int) -> str:
    """``train-f<k>-<nnnnnn>.tar`` (fold k) or ``test-<nnnnnn>.tar``."""
    return f"train-f{fold}-{index:06d}.tar" if split == "train" else f"test-{index:06d}.tar"


CURL_EXIT = {6: "cannot resolve the host", 7: "cannot connect to the server", 22: "the server answered with an "
             "HTTP error (not found?)", 28: "timed out"}


def is_url(text: str) -> bool:
    """A URL read through webdataset's gopen (a ``pipe:`` command included), not a local path."""
    return text.startswith("pipe:") or "://" in text


def check_scheme(url: str) -> None:
    """InputError naming ``url`` when webdataset's gopen has no reader for its scheme."""
    from webdataset.gopen import gopen_schemes   # imports torch: only for URLs

    scheme = "pipe" if url.startswith("pipe:") else url.split("://", 1)[0]
    if scheme not in gopen_schemes:
        known = ", ".join(f"{k}:" if k == "pipe" else f"{k}://" for k in gopen_schemes if k != "__default__")
        raise InputError(f"{url}: no reader for {scheme!r} URLs (a local folder, file://, {known})")


def open_shard(path: str):
    """(binary stream, seekable) of one file of a shard folder: a local file, or a URL through gopen.
    A local file that cannot be opened raises OSError; a URL's failure shows when it is read."""
    if not is_url(path):
        # a buffer smaller than a tile: Python's buffered reader reads a request larger than its
        # buffer straight into the result (one copy), a smaller one through the buffer (two)
        return open(path, "rb", buffering=1 << 16), True
    from webdataset.gopen import gopen

    check_scheme(path)
    return gopen(path, "rb"), False


def stop_reading(stream) -> None:
    """Close ``stream`` before its end without an error of its own. A URL's command whose pipe is
    closed early dies of SIGPIPE (or exits 1, reporting the broken pipe), which webdataset raises at
    close: no error when the reader has what it needs, and one that would hide the reader's own."""
    gopen = sys.modules.get("webdataset.gopen")   # not imported: the stream is no pipe
    if gopen is not None:
        gopen.set_options(stream, ignore_errors=True)
    stream.close()


class Location:
    """Where a shard folder lives: a local folder, or a URL read through webdataset's gopen."""

    def __init__(self, text):
        text = str(text)
        if text.startswith("file://"):
            text = url2pathname(urlparse(text).path)
        self.remote = is_url(text)
        self.text = text.rstrip("/") if self.remote else text
        self.path = None if self.remote else Path(text).resolve()
        if self.remote:
            check_scheme(self.text)
        if self.text.startswith("pipe:") and "{name}" not in self.text:
            raise InputError(f"{self.text}: a pipe: shard folder needs {{name}} in its command (where each "
                             "file's name goes)")

    def __truediv__(self, name: str):
        """The path (local) or URL of a file of the folder."""
        if not self.remote:
            return self.path / name
        return self.text.replace("{name}", name) if self.text.startswith("pipe:") else f"{self.text}/{name}"

    def __str__(self) -> str:
        return self.text if self.remote else str(self.path)

    def exists(self) -> bool:
        return True if self.remote else self.path.is_dir()

    def open(self, name: str):
        """A binary stream of one file of the folder; InputError naming it when it cannot be read."""
        try:
            return open_shard(str(self / name))[0]
        except OSError as exc:
            raise InputError(f"{self / name}: cannot read ({exc.strerror or exc})") from None

    def read(self, name: str) -> bytes:
        try:
            with self.open(name) as f:
                return f.read()
        except OSError as exc:
            raise InputError(f"{self / name}: cannot read ({remote_reason(exc)})") from None


def remote_reason(exc: BaseException) -> str:
    """Why a URL could not be read, in words (its command's exit status, as webdataset reports it)."""
    match = re.search(r"exit (-?\d+)", str(exc))
    if match:
        code = int(match.group(1))
        if code < 0:
            return f"the command was killed by signal {-code}"
        return f"{CURL_EXIT.get(code, 'the command failed')}, exit status {code}"
    return one_line(exc)[:200]


PROVENANCE_KEYS = ("created", "source", "tool_version")   # not part of a shard set's identity


@dataclass(frozen=True)
class Manifest:
    root: Location
    data: dict
    raw: bytes = field(default=b"", repr=False)

    @property
    def num_folds(self) -> int:
        return int(self.data["num_folds"])

    @property
    def sha256(self) -> str:
        """Hash of the manifest file as written (its packing time and source path included)."""
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def identity(self) -> str:
        """Hash of what the shards hold: every entry except when, where from and by which tool version
        they were packed. The same tiles packed again with the same settings are the same data."""
        content = {k: v for k, v in self.data.items() if k not in PROVENANCE_KEYS}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def shards(self, split: str, folds=None) -> list[dict]:
        """Shard entries of a split, optionally only those of the given folds, in manifest order."""
        out = [s for s in self.data["shards"] if s["split"] == split]
        if folds is not None:
            folds = set(folds)
            out = [s for s in out if s["fold"] in folds]
        return out

    def shard_path(self, entry: dict):
        """The shard's path (a local folder) or URL."""
        return self.root / entry["name"]

    def class_pixels(self, folds=None) -> np.ndarray:
        """Pixel count per class (10,) summed over the given folds (all folds when None)."""
        per_fold = self.data["fold_class_pixels"]
        keys = per_fold.keys() if folds is None else [str(f) for f in folds]
        total = np.zeros(NUM_CLASSES, dtype=np.int64)
        for k in keys:
            total += np.asarray(per_fold[k], dtype=np.int64)
        return total

    @property
    def channel_mean(self) -> np.ndarray:
        return np.asarray(self.data["channel_stats"]["mean"], dtype=np.float64)

    @property
    def channel_std(self) -> np.ndarray:
        return np.asarray(self.data["channel_stats"]["std"], dtype=np.float64)


def load_manifest(root) -> Manifest:
    """Read and check a shard folder's manifest; :class:`InputError` with one clear line otherwise."""
    location = Location(root)
    if not location.exists():
        raise InputError(f"{root}: shard folder does not exist")
    path = location / MANIFEST_NAME
    if not location.remote and not path.is_file():
        raise InputError(f"{path}: no manifest; the shard folder is incomplete (re-run `lc-shard pack`)")
    try:
        raw = location.read(MANIFEST_NAME)
    except InputError as exc:
        raise InputError(f"{exc}; no manifest there (the shard folder is incomplete or the URL wrong)") from None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: unreadable manifest: not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise InputError(f"{path}: manifest lacks {', '.join(missing)}")
    if data["format_version"] != FORMAT_VERSION:
        raise InputError(f"{path}: format version {data['format_version']}, this tool reads {FORMAT_VERSION}")
    problem = _layout_problem(data)
    if problem:
        raise InputError(f"{path}: {problem}")
    return Manifest(root=location, data=data, raw=raw)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry) -> str | None:
    """What makes one shard entry unusable, or None. Its name is checked against the pattern because
    a ``pipe:`` folder puts it into a shell command."""
    missing = [k for k in ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
    if missing:
        return f"lacks {', '.join(missing)}"
    if not isinstance(entry["name"], str) or not SHARD_NAME_PATTERN.match(entry["name"]):
        return f"has name {entry['name']!r}, not a shard's name"
    if entry["split"] not in ("train", "test"):
        return f"has split {entry['split']!r}"
    if not (_count(entry["count"]) and _count(entry["bytes"])):
        return f"has count {entry['count']!r} and bytes {entry['bytes']!r}, not counts"
    if not (entry["fold"] is None if entry["split"] == "test" else _count(entry["fold"])):
        return f"has fold {entry['fold']!r} for a {entry['split']} shard"
    if not (isinstance(entry["keys"], list) and all(isinstance(k, str) for k in entry["keys"])):
        return "has keys that are not a list of ids"
    return None


def _layout_problem(data: dict) -> str | None:
    """What in the manifest's layout (not its content, which ``lc-shard verify`` checks against the
    shards) the readers could not use, or None."""
    if not _count(data["num_folds"]) or data["num_folds"] == 0:
        return f"num_folds {data['num_folds']!r}, not a positive count"
    if not isinstance(data["shards"], list):
        return "shards is not a list"
    for i, entry in enumerate(data["shards"]):
        problem = _entry_problem(entry)
        if problem:
            return f"shard entry {i} {problem}"
    per_fold = data["fold_class_pixels"]
    folds = [str(k) for k in range(data["num_folds"])]
    if not isinstance(per_fold, dict) or any(not isinstance(per_fold.get(k), list) for k in folds):
        return f"fold_class_pixels lacks a list for each of folds 0..{data['num_folds'] - 1}"
    if not all(isinstance(data[k], dict) for k in ("folds", "counts", "channel_stats")):
        return "folds, counts and channel_stats must be JSON objects"
    return None
