"""Wall time of a small 4-fold CV run in parallel against the same folds one after another.

    python benchmarks/cv_parallel.py [--executor slurm|local] [--rounds 2] [--epochs 2] [--tasks 1]
                                     [--work DIR] [--json FILE]

Both runs go through ``dist-lc cv`` (submitit, the local Slurm by default): "parallel" with
``launcher.max_parallel=0`` (every fold at once: one Slurm array), "sequential" with
``launcher.max_parallel=1`` (the array throttled to one task at a time, ``%1``). The shards are the real
sample packed in 4 folds (225 training tiles per fold); the model is the smoke recipe's narrow U-Net
on 32-pixel crops. Rounds alternate the two modes. Reported: the wall time of each ``dist-lc cv``
(submission to report), its ratio, and the work inside the jobs (training and prediction seconds
from each fold's done.json) to show the per-job overhead (interpreter start, imports, scheduling).

Results: docs/BENCHMARKS.md. The speed-up is bounded by the machine: on 2 cores, 4 concurrent
single-task jobs share 2 cores, so the best one can hope for is about 2× plus the overlap of
start-up and I/O waits.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_lc.config import LauncherConfig, choices  # noqa: E402
from common import REPO, SAMPLE_SRC, machine_line  # noqa: E402

EXECUTORS = choices(LauncherConfig, "executor")


def shards(work: Path) -> Path:
    out = work / "shards-4fold"
    if not (out / "manifest.json").exists():
        from shard_tools.pack import pack

        pack(SAMPLE_SRC, out, folds=4, seed=0, samples_per_shard=16, workers=2, progress=False)
    return out


def cv_args(shard_dir: Path, args, max_parallel: int) -> list[str]:
    sets = [f"data.shards={shard_dir}", "data.crop=32", "data.workers=0", "model.filters=8",
            "model.upconv_filters=8", f"train.epochs={args.epochs}", "train.batch_size=8",
            "train.micro_batch_size=4", "train.precision=fp32", "train.plot_every=0",
            f"launcher.tasks_per_node={args.tasks}", "launcher.cpus_per_task=1", "launcher.time_min=30",
            f"launcher.max_parallel={max_parallel}", f"cv.folds={list(range(args.folds))}"]
    return ["--config", "configs/smoke.yaml", "--executor", args.executor, *[a for s in sets for a in ("--set", s)]]


def one_run(shard_dir: Path, work: Path, args, mode: str, round_: int) -> dict:
    out = work / f"cv-{mode}-{round_}"
    cmd = [sys.executable, "-m", "dist_lc", "cv", *cv_args(shard_dir, args, 1 if mode == "sequential" else 0),
           "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    done = [json.loads((out / f"fold{k}" / "done.json").read_text()) for k in range(args.folds)]
    return {"mode": mode, "round": round_, "wall_s": wall, "train_s": sum(d["train_s"] for d in done),
            "predict_s": sum(d["predict_s"] for d in done)}


def report(runs: list[dict], args) -> str:
    lines = ["| mode | round | wall s | train s (sum of folds) | predict s (sum of folds) |",
             "|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['mode']} | {r['round']} | {r['wall_s']:.1f} | {r['train_s']:.1f} | {r['predict_s']:.1f} |")
    best = {m: min(r["wall_s"] for r in runs if r["mode"] == m) for m in ("parallel", "sequential")}
    speedup = best["sequential"] / best["parallel"]
    lines += ["", f"speed-up (best sequential / best parallel wall time): {speedup:.2f}×",
              f"executor {args.executor}, {args.folds} folds × {args.tasks} task(s), {args.epochs} epoch(s)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--executor", default="slurm", choices=EXECUTORS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tasks", type=int, default=1, help="tasks (ranks) per fold job")
    p.add_argument("--folds", type=int, default=4, choices=(1, 2, 3, 4), help="folds run (of the 4 packed)")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary one)")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="1 round of 1 epoch on the local executor (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.epochs, args.executor, args.folds = 1, 1, "local", 2
    work = args.work or Path(tempfile.mkdtemp(prefix="cv_parallel-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_line()}", flush=True)
    shard_dir = shards(work)
    runs = []
    for round_ in range(1, args.rounds + 1):
        order = ("parallel", "sequential") if round_ % 2 else ("sequential", "parallel")
        for mode in order:
            runs.append(one_run(shard_dir, work, args, mode, round_))
            print(f"{mode} round {round_}: {runs[-1]['wall_s']:.1f} s", flush=True)
    print(report(runs, args))
    print(f"machine at the end: {machine_line()}")
    if args.json:
        record = {"machine": machine_line(), "runs": runs, "args": vars(args)}
        args.json.write_text(json.dumps(record, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
