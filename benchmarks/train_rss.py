"""Peak RSS of one training process under different allocator settings (BENCHMARKS finding 5).

Trains the same recipe for ``--epochs`` epochs in one process, once per setting, rounds
interleaved, and reports the trainer's own ``peak_mem_mb`` (getrusage high-water mark of the
rank-0 process, loader workers not included) and images/s from ``metrics.csv``:

    python benchmarks/train_rss.py --shards /tmp/dist_lc_quality/shards \\
        --setting default: --setting 'arena2: MALLOC_ARENA_MAX=2'

A setting is ``NAME: VAR=VALUE ...`` (environment variables for the training process).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, ensure_shards, machine_line, median, table  # noqa: E402

from dist_lc.run_log import read_metrics  # noqa: E402


def parse_setting(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    env = dict(kv.split("=", 1) for kv in rest.split())
    return name.strip() or "default", env


def train_once(config: Path, shards: Path, epochs: int, env: dict, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="train_rss-") as tmp:
        cmd = [sys.executable, "-m", "dist_lc", "train", "--config", str(config), "--run-dir", tmp,
               "--set", f"data.shards={shards}", "--set", f"train.epochs={epochs}", "--set", "train.plot_every=0"]
        for o in overrides:
            cmd += ["--set", o]
        started = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = read_metrics(tmp)
        return {"wall_s": time.perf_counter() - started,
                "peak_mb": max(float(r["peak_mem_mb"]) for r in rows),
                "images_per_s": median(float(r["images_per_s"]) for r in rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "benchmark.yaml")
    ap.add_argument("--shards", type=Path, default=Path("/tmp/bench_train_shards"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--setting", action="append", default=[], metavar="'NAME: VAR=VALUE ...'")
    args = ap.parse_args()
    shards = ensure_shards(args.shards)
    settings = [parse_setting(s) for s in args.setting] or [("default", {}), ("arena2", {"MALLOC_ARENA_MAX": "2"})]
    results = {name: [] for name, _ in settings}
    for r in range(args.rounds):
        for name, env in settings:
            res = train_once(args.config, shards, args.epochs, env, args.set)
            print(f"round {r + 1} {name}: {res}", file=sys.stderr, flush=True)
            results[name].append(res)
    base = median(x["peak_mb"] for x in results[settings[0][0]])
    rows = []
    for name, env in settings:
        peak = median(x["peak_mb"] for x in results[name])
        rows.append([name, " ".join(f"`{k}={v}`" for k, v in env.items()) or "–", f"{peak:.0f}",
                     f"{peak / base:.2f}×", f"{median(x['images_per_s'] for x in results[name]):.2f}",
                     f"{median(x['wall_s'] for x in results[name]):.0f}"])
    print(f"Machine: {machine_line()}; {args.config.name}, {args.epochs} epoch(s), {args.rounds} round(s), "
          f"overrides: {' '.join(args.set) or 'none'}\n")
    print(table(["setting", "environment", "peak RSS MB (median)", f"vs {settings[0][0]}", "images/s", "wall s"],
                rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
