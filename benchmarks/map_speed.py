"""Throughput and memory of ``dist-lc map``: megapixels per second for the recommended and the
benchmark U-Net, with and without TTA, on a mosaic of real tiles and on a large scene.

    python benchmarks/map_speed.py [--work DIR] [--size 4096] [--probabilities uint8|float32] [--json FILE]
    python benchmarks/map_speed.py --quick          # the test suite's smoke run

The checkpoints are trained here for one epoch on the real sample (the speed of a map does not
depend on how well the model learned); the scenes are a 3 × 4 mosaic of real tiles (768 × 1024)
and a ``--size``² scene of real tiles repeated, both in UTM 31N at 10 m. Each run is a fresh
``dist-lc map`` process with the default 64-pixel overlap; megapixels/s is the scene's pixels over
the command's wall time (start-up and writing included); the peak is the map's own report of its
resident memory (rank 0, VmHWM). The GeoTIFFs' size and their dead bytes: what the file holds
besides its header and the data its tiles point to (blocks that GDAL wrote again elsewhere).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, SAMPLE_SRC, ensure_shards, log, machine_line, table  # noqa: E402

import subprocess  # noqa: E402

RECIPES = {"recommended": "configs/recommended.yaml", "benchmark": "configs/benchmark.yaml"}


def checkpoint(work: Path, recipe: str, shards: Path, quick: bool) -> Path:
    run = work / f"ckpt-{recipe}"
    best = run / "checkpoints" / "best.pt"
    if not best.exists():
        sets = [f"data.shards={shards}", "train.epochs=1", "data.crop=32", "train.plot_every=0"]
        if quick:
            sets += ["model.filters=8", "model.upconv_filters=8"]
        subprocess.run([sys.executable, "-m", "dist_lc", "train", "--config", RECIPES[recipe], "--run-dir", str(run),
                        *[a for s in sets for a in ("--set", s)]], check=True, cwd=REPO, capture_output=True)
    return best


def scenes(work: Path, size: int) -> dict[str, Path]:
    import tifffile

    from dist_lc.synth.scenes import mosaic

    tiles = [tifffile.imread(p) for p in sorted((SAMPLE_SRC / "train" / "images").iterdir(),
                                                key=lambda p: int(p.stem))[:12]]
    out = {"mosaic 768×1024": work / "mosaic.tif", f"scene {size}×{size}": work / f"scene{size}.tif"}
    if not out["mosaic 768×1024"].exists():
        mosaic([tiles[r * 4:(r + 1) * 4] for r in range(3)], out["mosaic 768×1024"])
    big = out[f"scene {size}×{size}"]
    if not big.exists():
        n = -(-size // 256)
        mosaic([[tiles[(r * n + c) % 12] for c in range(n)] for r in range(n)], big, crop=(size, size))
    return out


def tiff_bytes(out: Path) -> tuple[int, int]:
    """(bytes, dead bytes) of the GeoTIFFs in ``out``: dead is what no tile of any page (the bands,
    the mask, overviews) points to, the header and its tags aside (under 4 KB per file)."""
    import tifffile

    size = dead = 0
    for path in sorted(out.glob("*.tif")):
        with tifffile.TiffFile(path) as tif:
            live = sum(sum(page.databytecounts) for page in tif.pages)
        size += path.stat().st_size
        dead += path.stat().st_size - live
    return size, dead


def run_map(ckpt: Path, scene: Path, out: Path, tta: bool, probabilities: str | None = None) -> dict:
    import rasterio

    cmd = [sys.executable, "-m", "dist_lc", "map", "--checkpoint", str(ckpt), "--out", str(out), str(scene),
           *(["--probabilities", probabilities] if probabilities else [])]
    started = time.perf_counter()
    proc = subprocess.run(cmd + (["--tta"] if tta else []), cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with rasterio.open(scene) as src:
        pixels = src.width * src.height
    peak = float(proc.stdout.split("peak memory of rank 0: ")[1].split()[0])
    size, dead = tiff_bytes(out)
    return {"wall_s": wall, "megapixels": pixels / 1e6, "mpx_per_s": pixels / 1e6 / wall, "peak_mb": peak,
            "tiff_mb": size / 2**20, "dead_mb": dead / 2**20}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_map_bench"))
    ap.add_argument("--size", type=int, default=4096, help="side of the large scene, pixels")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES))
    ap.add_argument("--probabilities", choices=["uint8", "float32"], help="also write the probabilities")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="a 512² scene, the recommended model, no TTA")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.recipes = 512, ["recommended"]
    args.work.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(args.work / "shards")
    found = scenes(args.work, args.size)
    results, rows = [], []
    for recipe in args.recipes:
        ckpt = checkpoint(args.work, recipe, shards, args.quick)
        for name, scene in found.items():
            for tta in (False,) if args.quick else (False, True):
                log(f"map {recipe} {name} tta={tta}")
                r = {"recipe": recipe, "scene": name, "tta": tta,
                     **run_map(ckpt, scene, args.work / f"out-{recipe}-{scene.stem}-{tta}", tta, args.probabilities)}
                results.append(r)
                rows.append([recipe, name, "8 views" if tta else "–", f"{r['megapixels']:.1f}", f"{r['wall_s']:.1f}",
                             f"{r['mpx_per_s']:.3f}", f"{r['peak_mb']:.0f}", f"{r['tiff_mb']:.2f}",
                             f"{r['dead_mb']:.2f} ({100 * r['dead_mb'] / max(r['tiff_mb'], 1e-9):.0f} %)"])
    print(f"Machine: {machine_line()}; one process, overlap 64 px, batches of 8 windows; "
          f"probabilities: {args.probabilities or 'not written'}\n")
    print(table(["model", "scene", "TTA", "Mpx", "wall s", "Mpx/s", "peak MB", "GeoTIFFs MB", "dead MB"], rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
