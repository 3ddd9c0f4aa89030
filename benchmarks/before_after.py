"""The trainer end to end in two checkouts, alternating: does a change make training slower?

    git worktree add /tmp/before <commit>
    python benchmarks/before_after.py --before /tmp/before           # ~10 min on 2 cores
    python benchmarks/before_after.py --before . --quick              # the suite's smoke run

Each round runs ``python -m dist_lc train --config configs/benchmark.yaml`` (2 epochs, 128² crops,
one loader worker, the machine's default device and precision) on the packed real sample, first in
``--before``, then in this checkout, each with its own code (the command starts in the checkout, so
that its ``dist_lc`` is the one imported). It prints, per run, the second epoch's images/s, its
data-wait share and validation seconds, and the final training loss (equal losses: the same numerics).
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import REPO, ensure_shards, log, machine_line, table


def run(tree: Path, shards: Path, out: Path, quick: bool) -> dict:
    sets = [f"data.shards={shards}", "data.crop=32" if quick else "data.crop=128",
            f"train.epochs={epochs(quick)}", "train.plot_every=0", "data.workers=1", "train.loggers=[]"]
    sets += ["model.filters=8", "model.upconv_filters=8"] if quick else []
    shutil.rmtree(out, ignore_errors=True)   # a run folder left by an earlier call would be resumed, not trained
    subprocess.run([sys.executable, "-m", "dist_lc", "train", "--config", "configs/benchmark.yaml",
                    *[a for s in sets for a in ("--set", s)], "--run-dir", str(out)],
                   cwd=tree, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = list(csv.DictReader((out / "metrics.csv").open()))[-1]
    return {k: float(last[k]) for k in ("images_per_s", "data_wait_frac", "val_time_s", "train_loss")}


def epochs(quick: bool) -> int:
    """The last epoch's row is compared: the second (the first warms caches up); the smoke run's only."""
    return 1 if quick else 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the commit to compare against")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_before_after"), help="shards and runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="one round of one epoch of a narrow U-Net on 32² crops "
                    "(a smoke run)")
    args = ap.parse_args(argv)
    shards = ensure_shards(args.work / "shards")
    trees = {"before": args.before.resolve(), "after": REPO}
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for round_ in range(1 if args.quick else args.rounds):
        for name, tree in trees.items():
            log(f"round {round_ + 1}: {name} ({tree})")
            results[name].append(run(tree, shards, args.work / f"{name}-{round_}", args.quick))
    rows = [[name, " / ".join(f"{r['images_per_s']:.2f}" for r in runs),
             f"{statistics.median(r['data_wait_frac'] for r in runs):.1%}",
             " / ".join(f"{r['val_time_s']:.1f}" for r in runs), f"{runs[-1]['train_loss']:.6f}"]
            for name, runs in results.items()]
    ratio = (statistics.median(r["images_per_s"] for r in results["after"])
             / statistics.median(r["images_per_s"] for r in results["before"]))
    print("\n".join([f"Machine: {machine_line()}", "",
                     table(["checkout", f"images/s, epoch {epochs(args.quick)}, each round", "data wait",
                            "validation s", "final loss"], rows), "", f"after / before: {ratio:.2f}×"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
