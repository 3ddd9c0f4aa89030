"""``manifest.json``: the index of a shard folder. Written last and atomically by ``pack``.

Schema (format_version 1)::

    {
      "format_version": 1, "tool_version": "0.1.0", "created": "<iso time>", "source": "<abs path>",
      "class_names": [10 names], "encoding": {"image": "npy", "mask": "npy", "props": "npy"},
      "image_shape": [256, 256, 4], "image_dtype": "uint16", "mask_dtype": "uint8",
      "num_folds": 5, "seed": 0,
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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np

from lc_common.errors import InputError
from .format import FORMAT_VERSION
from lc_common.tiles import NUM_CLASSES

MANIFEST_NAME = "manifest.json"
SHARD_NAME_PATTERN = re.compile(r"^(train-f\d+|test)-\d{6}\.tar$")
REQUIRED_KEYS = ("format_version", "class_names", "num_folds", "shards", "folds",
                 "fold_class_pixels", "channel_stats", "counts")


def shard_name(split: str, fold, index: int) -> str:
    """``train-f<k>-<nnnnnn>.tar`` (fold k) or ``test-<nnnnnn>.tar``."""
    return f"train-f{fold}-{index:06d}.tar" if split == "train" else f"test-{index:06d}.tar"


CURL_EXIT = {6: "cannot resolve the host", 7: "cannot connect to the server", 22: "the server answered with an "
             "HTTP error (not found?)", 28: "timed out"}


class Location:
    """Where a shard folder lives: a local folder, or a URL read through webdataset's gopen."""

    def __init__(self, text):
        text = str(text)
        if text.startswith("file://"):
            text = url2pathname(urlparse(text).path)
        self.remote = text.startswith("pipe:") or "://" in text
        self.text = text.rstrip("/") if self.remote else text
        self.path = None if self.remote else Path(text).resolve()

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
        target = self / name
        if not self.remote:
            try:
                return open(target, "rb")
            except OSError as exc:
                raise InputError(f"{target}: cannot read ({exc.strerror or exc})") from None
        from webdataset.gopen import gopen   # imports torch: only for URLs

        return gopen(target, "rb")

    def read(self, name: str) -> bytes:
        try:
            with self.open(name) as f:
                return f.read()
        except OSError as exc:
            raise InputError(f"{self / name}: cannot read ({remote_reason(exc)})") from None


def remote_reason(exc: BaseException) -> str:
    """Why a URL could not be read, in words (curl's exit status, as webdataset reports it)."""
    match = re.search(r"exit (\d+)", str(exc))
    if match:
        code = int(match.group(1))
        return f"{CURL_EXIT.get(code, 'the command failed')}, exit status {code}"
    return " ".join(str(exc).split())[:200]


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
    return Manifest(root=location, data=data, raw=raw)
