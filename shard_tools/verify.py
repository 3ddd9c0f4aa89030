"""Check a shard folder against its manifest, every byte and every sample.

For each shard in the manifest: the file exists; it reads as a tar to the end; every sample
decodes, has the members its split needs, an image of the right shape and dtype, a mask with
classes 0..9 and props equal to ``class_proportions(mask)``; the keys (in order) and count equal
the manifest's; the byte size and sha256 equal the manifest's. Then the manifest's own index:
fold of every id, counts, per-fold class pixels and channel statistics recomputed from the
samples; and no stray shard file that the manifest does not list.

The first problem is raised as :class:`InputError` naming the shard (and the sample when known),
with the number of further problems found.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from . import tarstream
from lc_common.errors import InputError
from .format import ENCODING, decode_checked
from lc_common.errors import one_line
from lc_common.tiles import IMAGE_SHAPE, NUM_CLASSES, check_image, class_pixels, class_proportions
from .manifest import (MANIFEST_NAME, SHARD_NAME_PATTERN, Location, Manifest, load_manifest, remote_reason,
                       stop_reading)
from .pack import ChannelStats, channel_sums

STATS_RTOL = 1e-9  # mean/std are recomputed with the same exact sums; only float rounding may differ


class _HashingReader:
    """A read-only file that hashes and counts what is read from it."""

    def __init__(self, file):
        self.file = file
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, size=-1) -> bytes:
        data = self.file.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def check_sample(raw: dict, split: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Decode and check one raw sample; ``(key, image, mask)``. Messages start with ``sample '<key>'``."""
    key, image, mask, props = decode_checked(raw, split)
    check_image(image.shape, image.dtype, f"sample {key!r}")
    if split == "train" and not np.array_equal(props, class_proportions(mask)):
        raise InputError(f"sample {key!r}: props differ from the class proportions of its mask")
    return key, image, mask


class _Totals:
    """What the samples add up to, for comparison with the manifest's index."""

    def __init__(self, manifest: Manifest):
        self.fold_pixels = {k: np.zeros(NUM_CLASSES, dtype=np.int64) for k in manifest.data["fold_class_pixels"]}
        self.channels = ChannelStats(IMAGE_SHAPE[2])
        self.key_count: Counter = Counter()

    def add(self, entry: dict, key: str, image: np.ndarray, mask: np.ndarray | None) -> None:
        self.key_count[(entry["split"], key)] += 1
        if mask is None:
            return
        pixels = class_pixels(mask)
        self.fold_pixels.setdefault(str(entry["fold"]), np.zeros(NUM_CLASSES, dtype=np.int64))
        self.fold_pixels[str(entry["fold"])] += pixels
        self.channels.add(channel_sums(image))


def _read_shard(root: Location, entry: dict, totals: _Totals) -> tuple[list[str], _HashingReader]:
    """Read, decode and check every sample of one shard (a sample named in any error)."""
    keys: list[str] = []
    seen: list[str] = []
    file = root.open(entry["name"])
    reader = _HashingReader(file)
    try:
        for raw in tarstream.samples(reader, seen=seen, strict=True):
            key, image, mask = check_sample(raw, entry["split"])
            keys.append(key)
            totals.add(entry, key, image, mask)
        reader.drain()
    except (tarstream.TarError, EOFError) as exc:
        stop_reading(file)
        at = f"at sample {seen[-1]!r}" if seen else "before the first sample"
        raise InputError(f"truncated or corrupt tar {at} ({one_line(exc)})") from None
    except BaseException:
        stop_reading(file)   # the reader's error, not the pipe's that its early close causes
        raise
    file.close()
    return keys, reader


def _first_key_difference(found: list[str], listed: list[str]) -> str:
    for i, (a, b) in enumerate(zip(found, listed)):
        if a != b:
            return f"sample {i} is {a!r}, the manifest lists {b!r}"
    return f"{len(found)} keys in the shard, {len(listed)} in the manifest"


def verify_shard(root: Location, entry: dict, totals: _Totals) -> None:
    """Check one shard against its manifest entry; :class:`InputError` naming the shard otherwise."""
    name = entry["name"]
    path = root / name
    if not root.remote and not path.is_file():
        raise InputError(f"{path}: shard missing")
    try:
        keys, reader = _read_shard(root, entry, totals)
    except InputError as exc:
        raise InputError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except OSError as exc:   # a URL that cannot be read
        raise InputError(f"{path}: cannot read the shard ({remote_reason(exc)})") from None
    if len(keys) != entry["count"]:
        raise InputError(f"{path}: {len(keys)} samples, manifest says {entry['count']}")
    if keys != list(entry["keys"]):
        raise InputError(f"{path}: keys differ from the manifest: {_first_key_difference(keys, entry['keys'])}")
    if reader.bytes != entry["bytes"]:
        raise InputError(f"{path}: {reader.bytes} bytes, manifest says {entry['bytes']}")
    if reader.sha.hexdigest() != entry["sha256"]:
        raise InputError(f"{path}: sha256 mismatch (the file changed after packing; every sample decodes, "
                         "so the change is in pixel data or tar padding)")


def _check_encoding(manifest: Manifest) -> None:
    """A known encoding, or the manifest is refused outright."""
    if manifest.data.get("encoding", ENCODING) != ENCODING:
        raise InputError(f"{manifest.root / MANIFEST_NAME}: encoding {manifest.data['encoding']}, "
                         f"this tool decodes {ENCODING}")


def _index_problems(manifest: Manifest) -> list[str]:
    """Problems in the manifest's own index: counts, folds table, duplicate and stray shards."""
    data, path = manifest.data, manifest.root / MANIFEST_NAME
    problems = []
    names = Counter(s["name"] for s in data["shards"])
    problems += [f"{path}: shard {n} listed {c} times" for n, c in names.items() if c > 1]
    for split in ("train", "test"):
        listed = sum(s["count"] for s in manifest.shards(split))
        if listed != data["counts"].get(split, 0):
            problems.append(f"{path}: {split} shards hold {listed} samples, counts says {data['counts'].get(split, 0)}")
    for entry in manifest.shards("train"):
        if not 0 <= entry["fold"] < manifest.num_folds:
            problems.append(f"{manifest.root / entry['name']}: fold {entry['fold']} outside 0..{manifest.num_folds - 1}")
        wrong = [k for k in entry["keys"] if data["folds"].get(k) != entry["fold"]]
        if wrong:
            problems.append(f"{manifest.root / entry['name']}: sample {wrong[0]!r} is in fold "
                            f"{data['folds'].get(wrong[0])} by the manifest's folds, the shard is fold {entry['fold']}")
    local = [] if manifest.root.remote else manifest.root.path.iterdir()   # a URL cannot be listed
    stray = sorted(p.name for p in local if SHARD_NAME_PATTERN.match(p.name) and p.name not in names)
    problems += [f"{manifest.root / n}: shard file not listed in the manifest" for n in stray]
    return problems


def _totals_problems(manifest: Manifest, totals: _Totals) -> list[str]:
    """Problems where the samples do not add up to the manifest's index."""
    data, path = manifest.data, manifest.root / MANIFEST_NAME
    problems = [f"{path}: sample {k!r} appears {c} times in {split} shards"
                for (split, k), c in totals.key_count.items() if c > 1]
    in_shards = {k for split, k in totals.key_count if split == "train"}
    missing = sorted(set(data["folds"]) - in_shards)
    if missing:
        problems.append(f"{path}: {len(missing)} ids of the folds table are in no shard (first {missing[0]!r})")
    for fold, pixels in sorted(totals.fold_pixels.items()):
        listed = data["fold_class_pixels"].get(fold)
        if listed is None or list(map(int, listed)) != pixels.tolist():
            problems.append(f"{path}: fold {fold} class pixels {pixels.tolist()}, manifest says {listed}")
    problems += _stats_problems(path, data["channel_stats"], totals.channels.to_json())
    return problems


def _stats_problems(path: Path, listed: dict, found: dict) -> list[str]:
    for name in ("mean", "std", "min", "max"):
        a, b = np.asarray(found[name], dtype=np.float64), np.asarray(listed.get(name, []), dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=STATS_RTOL, atol=0):
            return [f"{path}: channel {name} {found[name]} recomputed, manifest says {listed.get(name)}"]
    return []


def verify(root) -> None:
    """Check every shard of ``root`` against its manifest; :class:`InputError` on the first problem."""
    manifest = load_manifest(root)
    _check_encoding(manifest)
    problems = []
    totals = _Totals(manifest)
    for entry in manifest.data["shards"]:
        try:
            verify_shard(manifest.root, entry, totals)
        except InputError as exc:
            problems.append(str(exc))
    problems += _index_problems(manifest)
    if not problems:
        problems = _totals_problems(manifest, totals)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
