"""Where the wall time of a whole ``dist-lc cv`` goes: training epochs against everything else.

    python benchmarks/cv_overhead.py --work /tmp/ov --fold-minutes 3          # this checkout
    python benchmarks/cv_overhead.py --work /tmp/ov --fold-minutes 3 --repo /tmp/old --label before
    python benchmarks/cv_overhead.py --work /tmp/ov-slurm --executor slurm    # through the local Slurm
    python benchmarks/cv_overhead.py --quick --work /tmp/ov-quick             # the suite's smoke run

Runs ``dist-lc cv`` of ``configs/recommended.yaml`` on the real sample's 5 folds (the local
executor or ``--executor slurm``, 2 DDP ranks per fold, one fold at a time, ``train.time_limit =
--fold-minutes``) from ``--repo`` (a checkout; another commit's, to compare before and after in one
session), and reports the command's
wall time, the seconds of training epochs (metrics.csv's ``epoch_time_s``, summed), the share of
the wall time outside them, and, where the checkout records it (done.json's ``timeline``), each
fold job's split: process start-up, set-up, epochs, validation, checkpoints and logs, prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_lc.config import LauncherConfig, choices  # noqa: E402
from common import REPO, SAMPLE_SRC, cv_command, log, machine_line, table  # noqa: E402

EXECUTORS = choices(LauncherConfig, "executor")


def run(args) -> dict:
    repo = args.repo.resolve()
    shards = args.work / "shards"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    if not (shards / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(SAMPLE_SRC), "--out", str(shards)],
                       check=True, cwd=repo, env=env, stdout=subprocess.DEVNULL)
    out = args.work / f"cv-{args.label}"
    cmd = cv_command("configs/recommended.yaml", out, shards, args.fold_minutes, args.folds, sets=args.set,
                     executor=args.executor)
    log(f"{args.label}: {' '.join(cmd)}")
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"dist-lc cv failed:\n{proc.stderr[-3000:]}")
    folds = []
    for k in args.folds:
        run_dir = out / f"fold{k}"
        import csv

        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        done = json.loads((run_dir / "done.json").read_text())
        folds.append({"fold": k, "epochs": len(rows), "epochs_s": sum(float(r["epoch_time_s"]) for r in rows),
                      "predict_s": done.get("predict_s"), "timeline": done.get("timeline")})
    report = json.loads((out / "report.json").read_text())
    return {"label": args.label, "repo": str(repo), "wall_s": wall, "folds": folds, "oof_kl": report.get("oof_kl"),
            "epochs_s": sum(f["epochs_s"] for f in folds)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to run (default: this one)")
    ap.add_argument("--label", default="this checkout")
    ap.add_argument("--executor", choices=EXECUTORS, default="local",
                    help="slurm: the cluster sbatch reaches (slurm/local-cluster.sh starts one on this machine)")
    ap.add_argument("--fold-minutes", type=float, default=3.0)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="2 folds, 0.1 minute each, a tiny model (a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.folds, args.fold_minutes = [0, 1], 0.1
        args.set += ["data.crop=32", "model.filters=8", "model.upconv_filters=8", "data.workers=0"]
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(args)
    outside = 1 - result["epochs_s"] / result["wall_s"]
    print(f"Machine: {machine_line()}; {args.label} ({result['repo']}), {len(args.folds)} folds × "
          f"{args.fold_minutes:g} min, 2 DDP ranks per fold, one fold at a time, {args.executor} executor\n")
    print(f"dist-lc cv wall {result['wall_s']:.0f} s, training epochs {result['epochs_s']:.0f} s: "
          f"**{outside:.0%} outside the epochs**; oof KL {result['oof_kl']:.4f}\n")
    keys = ("process_start_s", "setup_s", "epochs_s", "validation_s", "bookkeeping_s", "predict_s", "job_s")
    rows = [[f["fold"], f["epochs"], *(f"{f['timeline'].get(k, 0):.1f}" for k in keys)]
            for f in result["folds"] if f.get("timeline")]
    if rows:
        print(table(["fold", "epochs", "start-up s", "set-up s", "epochs s", "validation s", "checkpoints+logs s",
                     "predict s", "job s"], rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
