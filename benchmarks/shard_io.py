"""I/O benchmark of the shard format (results: docs/BENCHMARKS.md).

    python benchmarks/shard_io.py [--src DIR] [--work DIR] [--workers 2] [--json FILE]

Measures, on the real sample (or any folder in the challenge layout):

1. packing throughput (tiles/s) of ``shard_tools.pack``;
2. read throughput of the training input, samples/s decoded into torch tensors (uint16 image,
   uint8 mask; scaling to float is left to the device): WebDataset shards through a torch DataLoader vs the
   per-file TIFFs read the way the Preligens benchmark reads them (per sample ``TiffFile(image)``
   and ``TiffFile(mask)``), both with 0 and 2 loader workers, with the plain ``read()`` rate of the
   shard files as the ceiling; cold page cache (``/proc/sys/vm/drop_caches``, when allowed) and warm;
3. in-shard encodings: bytes per tile and encode/decode cost of raw .npy, TIFF bytes, zlib'd .npy,
   byte-shuffled zlib'd .npy and zlib'd TIFF;
4. fold stratification: the largest KL of a fold's mean proportions vs the global mean, for the
   packer's method, a sorted round-robin deal and a random split, on ``train_labels.csv``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from lc_common.tiles import MAX_PIXEL_VALUE
from shard_tools.describe import kl_divergence
from shard_tools.folds import assign_folds, rarity_weights
from shard_tools.format import decode_sample
from shard_tools.pack import pack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SAMPLE_SRC as DEFAULT_SRC, machine_line  # noqa: E402

BATCH = 16


# ---------------------------------------------------------------- helpers


def drop_caches() -> bool:
    """Drop the page cache (root only; some sandboxes refuse). True when the kernel accepted it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What the loader hands over: uint16 image H×W×4 and uint8 mask as tensors, no copy.

    Scaling to float belongs on the device (it would add the same CPU cost to every reader,
    see ``float32_ms`` in the report), so only reading and decoding differ between readers.
    """
    return torch.from_numpy(image), torch.from_numpy(mask)


def float32_ms(src: Path, n: int = 64) -> float:
    """ms per tile of the CPU alternative: float32 C×H×W scaled by 1/24356, int64 mask."""
    arrays = [(tifffile.imread(p), tifffile.imread(src / "train/masks" / p.name))
              for p in sorted((src / "train/images").glob("*.tif"))[:n]]
    start = time.perf_counter()
    for image, mask in arrays:
        torch.from_numpy(image.astype(np.float32) / MAX_PIXEL_VALUE).permute(2, 0, 1).contiguous()
        torch.from_numpy(mask.astype(np.int64))
    return (time.perf_counter() - start) * 1e3 / n


def decode_to_tensors(sample: dict):  # module level: DataLoader workers pickle it
    _, image, mask, _ = decode_sample(sample)
    return to_tensors(image, mask)


class TiffDataset(Dataset):
    """One sample = open the image TIFF and the mask TIFF, as the Preligens benchmark's loader does."""

    def __init__(self, src: Path, ids: list[str]):
        self.src, self.ids = src, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        with tifffile.TiffFile(self.src / "train/images" / f"{self.ids[i]}.tif") as tif:
            image = tif.asarray()
        with tifffile.TiffFile(self.src / "train/masks" / f"{self.ids[i]}.tif") as tif:
            mask = tif.asarray()
        return to_tensors(image, mask)


def shard_dataset(paths: list[Path]):
    return wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False).map(decode_to_tensors)


def loader_rate(dataset, workers: int) -> float:
    """Samples/s through a DataLoader, timed from the first batch (worker start-up excluded)."""
    loader = DataLoader(dataset, batch_size=BATCH, num_workers=workers)
    start, n, first = None, 0, 0
    for x, _ in loader:
        if start is None:
            start, first = time.perf_counter(), len(x)
        n += len(x)
    return (n - first) / (time.perf_counter() - start)


def raw_read_rate(paths: list[Path]) -> float:
    """Bytes/s of plain sequential read() of the files."""
    start, total = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


# ---------------------------------------------------------------- 1. pack


def bench_pack(src: Path, out: Path, workers: int) -> dict:
    start = time.perf_counter()
    manifest = pack(src, out, samples_per_shard=20, workers=workers, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    tiles = sum(manifest.data["counts"].values())
    size = sum(s["bytes"] for s in manifest.data["shards"])
    return {"workers": workers, "tiles": tiles, "seconds": seconds, "tiles_per_s": tiles / seconds,
            "MB_per_s": size / 1e6 / seconds}


# ---------------------------------------------------------------- 2. read


def bench_read(src: Path, shards: Path, cold: bool, rounds: int) -> dict:
    """Best samples/s of each reader over ``rounds`` interleaved rounds (cold: page cache dropped first)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entries = [s for s in manifest["shards"] if s["split"] == "train"]
    paths = [shards / s["name"] for s in entries]
    ids = [k for s in entries for k in s["keys"]]
    bytes_per_sample = sum(s["bytes"] for s in entries) / len(ids)
    readers = {
        "raw read() of shards": lambda: raw_read_rate(paths) / bytes_per_sample,
        "shards, 0 workers": lambda: loader_rate(shard_dataset(paths), 0),
        "shards, 2 workers": lambda: loader_rate(shard_dataset(paths), 2),
        "TIFF files, 0 workers": lambda: loader_rate(TiffDataset(src, ids), 0),
        "TIFF files, 2 workers": lambda: loader_rate(TiffDataset(src, ids), 2),
    }
    results = dict.fromkeys(readers, 0.0)
    for _ in range(rounds):
        for name, run in readers.items():
            if cold:
                drop_caches()
            results[name] = max(results[name], run())
    results["raw read() MB/s"] = results["raw read() of shards"] * bytes_per_sample / 1e6
    return results


# ---------------------------------------------------------------- 3. encodings


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _from_npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _tiff(a: np.ndarray, compression=None) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, a, photometric="minisblack", planarconfig="contig" if a.ndim == 3 else None,
                     compression=compression)
    return buf.getvalue()


def _shuffle_zlib(a: np.ndarray) -> bytes:
    """Byte planes apart (all low bytes, then all high bytes), then zlib level 1: Blosc's trick."""
    planes = a.reshape(-1).view(np.uint8).reshape(-1, a.itemsize).T
    header = json.dumps([a.dtype.str, a.shape]).encode()
    return len(header).to_bytes(2, "little") + header + zlib.compress(planes.tobytes(), 1)


def _unshuffle_zlib(b: bytes) -> np.ndarray:
    n = int.from_bytes(b[:2], "little")
    dtype, shape = json.loads(b[2:2 + n])
    dtype = np.dtype(dtype)
    planes = np.frombuffer(zlib.decompress(b[2 + n:]), np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


ENCODINGS = {
    "npy (raw)": (_npy, _from_npy),
    "tiff": (_tiff, lambda b: tifffile.imread(io.BytesIO(b))),
    "npy + zlib 1": (lambda a: zlib.compress(_npy(a), 1), lambda b: _from_npy(zlib.decompress(b))),
    "npy + zlib 6": (lambda a: zlib.compress(_npy(a), 6), lambda b: _from_npy(zlib.decompress(b))),
    "byte-shuffle + zlib 1": (_shuffle_zlib, _unshuffle_zlib),
    "tiff + zlib": (lambda a: _tiff(a, "zlib"), lambda b: tifffile.imread(io.BytesIO(b))),  # stdlib zlib
}


def bench_encodings(src: Path, n: int) -> dict:
    """Bytes per tile (image + mask) and ms per tile to encode and to decode, best of 3."""
    ids = sorted((p.stem for p in (src / "train/images").glob("*.tif")), key=int)[:n]
    arrays = [(tifffile.imread(src / "train/images" / f"{i}.tif"), tifffile.imread(src / "train/masks" / f"{i}.tif"))
              for i in ids]
    results = {}
    for name, (encode, decode) in ENCODINGS.items():
        start = time.perf_counter()
        blobs = [(encode(im), encode(mk)) for im, mk in arrays]
        encode_ms = (time.perf_counter() - start) * 1e3 / n
        decode_ms = []
        for _ in range(3):
            start = time.perf_counter()
            decoded = [(decode(a), decode(b)) for a, b in blobs]
            decode_ms.append((time.perf_counter() - start) * 1e3 / n)
        assert all(np.array_equal(d[0], a[0]) and np.array_equal(d[1], a[1]) for d, a in zip(decoded, arrays))
        results[name] = {"bytes": sum(len(a) + len(b) for a, b in blobs) / n,
                         "encode_ms": encode_ms, "decode_ms": min(decode_ms)}
    return results


# ---------------------------------------------------------------- 4. folds


def _round_robin(props: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sort by dominant class, then rarity; deal each block of k in a seeded random order."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(props)), -(props @ rarity_weights(props)), props.argmax(axis=1)))
    folds = np.empty(len(props), dtype=np.int64)
    for start in range(0, len(order), k):
        block = order[start:start + k]
        folds[block] = rng.permutation(k)[: len(block)]
    return folds


def _random(props: np.ndarray, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(len(props)) % k


def bench_folds(src: Path, k: int = 5, seeds: int = 5) -> dict:
    """Largest fold-vs-global KL (challenge formula), mean and worst over seeds, per method and set."""
    labels = pd.read_csv(src / "train_labels.csv")
    local = {int(p.stem) for p in (src / "train/images").glob("*.tif")}
    sets = {f"train_labels.csv ({len(labels)} tiles)": labels.iloc[:, 1:].to_numpy(np.float64),
            f"sample ({len(local)} tiles)": labels[labels.sample_id.isin(local)].iloc[:, 1:].to_numpy(np.float64)}
    methods = {"pack (greedy deficit)": assign_folds, "sorted round-robin": _round_robin, "random": _random}
    results = {}
    for set_name, props in sets.items():
        overall = props.mean(axis=0)
        for method, fn in methods.items():
            worst = []
            for seed in range(seeds):
                folds = fn(props, k, seed)
                worst.append(max(kl_divergence(overall, props[folds == f].mean(axis=0)) for f in range(k)))
            results[f"{set_name} | {method}"] = {"mean": float(np.mean(worst)), "worst": float(np.max(worst))}
    return results


# ---------------------------------------------------------------- report


def _print_report(r: dict) -> None:
    print(f"# shard I/O benchmark — {r['date']} — {r['machine']}\n")
    for p in r["pack"]:
        print(f"pack, {p['workers']} worker(s): {p['tiles']} tiles in {p['seconds']:.2f} s = "
              f"{p['tiles_per_s']:.0f} tiles/s ({p['MB_per_s']:.0f} MB/s of shards)")
    print(f"\npage cache drop: {'works' if r['drop_caches'] else 'refused (cold figures are warm)'}")
    print("\n| reader (train samples → torch tensors) | cold samples/s | warm samples/s |\n|---|---:|---:|")
    for name in r["read"]["warm"]:
        print(f"| {name} | {r['read']['cold'][name]:.0f} | {r['read']['warm'][name]:.0f} |")
    for cache in ("cold", "warm"):
        rd = r["read"][cache]
        print(f"{cache}: shards/TIFF ratio, 0 workers {rd['shards, 0 workers'] / rd['TIFF files, 0 workers']:.2f}x, "
              f"2 workers {rd['shards, 2 workers'] / rd['TIFF files, 2 workers']:.2f}x")
    print("\n| encoding | bytes/tile | encode ms/tile | decode ms/tile |\n|---|---:|---:|---:|")
    for name, e in r["encodings"].items():
        print(f"| {name} | {e['bytes']:.0f} | {e['encode_ms']:.2f} | {e['decode_ms']:.2f} |")
    print(f"(for reference: converting a tile to float32 C×H×W + int64 mask on the CPU: {r['float32_ms']:.2f} ms)")
    print("\n| folds (K=5, 5 seeds) | max fold KL, mean | worst |\n|---|---:|---:|")
    for name, f in r["folds"].items():
        print(f"| {name} | {f['mean']:.2e} | {f['worst']:.2e} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shard_io_bench"))
    parser.add_argument("--workers", type=int, default=2, help="pack workers")
    parser.add_argument("--rounds", type=int, default=3, help="runs per reader and cache state (best kept)")
    parser.add_argument("--encode-tiles", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="1 round, 8 tiles per encoding (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.encode_tiles = 1, 8
    shards = args.work / "shards"
    torch.set_num_threads(1)
    r = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": f"{machine_line()}, torch {torch.__version__}",
         "pack": [bench_pack(args.src, shards, w) for w in sorted({1, args.workers})],
         "drop_caches": drop_caches()}
    r["read"] = {"cold": bench_read(args.src, shards, cold=True, rounds=args.rounds),
                 "warm": bench_read(args.src, shards, cold=False, rounds=args.rounds)}
    r["encodings"] = bench_encodings(args.src, args.encode_tiles)
    r["float32_ms"] = float32_ms(args.src)
    r["folds"] = bench_folds(args.src)
    r["machine"] += f"; at the end: load average {os.getloadavg()[0]:.1f}"
    _print_report(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
