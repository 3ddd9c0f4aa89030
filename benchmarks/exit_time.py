"""How long a dist_lc process takes to exit once its work is done: with the package's exit as shipped
(the interpreter's last garbage collections skipped, ``gc.freeze`` at exit) against the same process
with that handler removed, interleaved in one run.

Each process imports the trainer, builds the Setup of configs/smoke.yaml on a few synthetic tiles
(torch's modules, the model, the optimizer: the objects a rank holds at its end), writes the time,
and exits; the figure is the time from that write to the process being gone, as its parent sees it::

    python benchmarks/exit_time.py [--rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, print_interleaved, synthetic_shards  # noqa: E402

CHILD = """
import atexit, gc, sys, time
from dist_lc.config import load_config
from dist_lc.train import build_setup
if sys.argv[2] == "before":
    atexit.unregister(gc.freeze)   # the exit as it was: the interpreter's last collections walk everything
s = build_setup(load_config("configs/smoke.yaml", [f"data.shards={sys.argv[1]}", "data.workers=0"]))
print(repr(time.time()), flush=True)
"""


def one_exit(shards: Path, variant: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(shards), variant], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    if proc.wait() != 0 or not line:
        raise SystemExit(f"exit_time: the {variant} process failed (exit {proc.returncode})")
    done = float(line)
    return time.time() - done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one round (a smoke run)")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    seconds = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="exit_time-") as work:
        shards = synthetic_shards(Path(work), 40)
        for _ in range(rounds):
            for variant in seconds:
                seconds[variant].append(one_exit(shards, variant))
    print_interleaved(f"{rounds} round(s), interleaved", "exit", seconds, after="after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
