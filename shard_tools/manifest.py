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
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .format import FORMAT_VERSION, NUM_CLASSES

MANIFEST_NAME = "manifest.json"
SHARD_NAME_PATTERN = re.compile(r"^(train-f\d+|test)-\d{6}\.tar$")
REQUIRED_KEYS = ("format_version", "class_names", "num_folds", "shards", "folds",
                 "fold_class_pixels", "channel_stats", "counts")


def shard_name(split: str, fold, index: int) -> str:
    """``train-f<k>-<nnnnnn>.tar`` (fold k) or ``test-<nnnnnn>.tar``."""
    return f"train-f{fold}-{index:06d}.tar" if split == "train" else f"test-{index:06d}.tar"


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    @property
    def num_folds(self) -> int:
        return int(self.data["num_folds"])

    @property
    def sha256(self) -> str:
        """Hash of the manifest file: identifies the exact shard set a checkpoint was trained on."""
        return hashlib.sha256((self.root / MANIFEST_NAME).read_bytes()).hexdigest()

    def shards(self, split: str, folds=None) -> list[dict]:
        """Shard entries of a split, optionally only those of the given folds, in manifest order."""
        out = [s for s in self.data["shards"] if s["split"] == split]
        if folds is not None:
            folds = set(folds)
            out = [s for s in out if s["fold"] in folds]
        return out

    def shard_path(self, entry: dict) -> Path:
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
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: shard folder does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise InputError(f"{path}: no manifest; the shard folder is incomplete (re-run `lc-shard pack`)")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable manifest: {exc}") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise InputError(f"{path}: manifest lacks {', '.join(missing)}")
    if data["format_version"] != FORMAT_VERSION:
        raise InputError(f"{path}: format version {data['format_version']}, this tool reads {FORMAT_VERSION}")
    return Manifest(root=root.resolve(), data=data)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path, obj) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; others sharing the folder must read it
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
