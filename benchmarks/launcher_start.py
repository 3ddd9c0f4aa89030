"""What a launcher costs before it does anything: the wall time and peak memory of a process that
imports what ``dist-lc cv``, ``dist-lc tune`` and ``dist-lc report`` import, in two checkouts,
interleaved (a launcher of a long CV or search sits on a login node for its whole length)::

    git worktree add /tmp/before <commit>
    python benchmarks/launcher_start.py --before /tmp/before [--rounds 5]
    python benchmarks/launcher_start.py --before . --quick            # the suite's smoke run

Each process starts in its checkout (its ``dist_lc`` is the one imported) and says whether torch
came with the imports; peak memory is the process's maximum resident set, as ``wait4`` reports it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, machine_line, median, spread, table  # noqa: E402

CHILD = ("import sys\nimport dist_lc.cli, dist_lc.cv.launch, dist_lc.tune.launch, dist_lc.cv.report\n"
         "print('torch' in sys.modules)")


def one_start(tree: Path) -> tuple[float, float, bool]:
    """(seconds, peak MB, torch imported) of one launcher's imports in ``tree``."""
    read, write = os.pipe()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:   # the child: the imports alone, in the checkout, output to the pipe
        os.chdir(tree)
        os.dup2(write, 1)
        os.execv(sys.executable, [sys.executable, "-c", CHILD])
    os.close(write)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - started
    with os.fdopen(read) as out:
        said = out.read().strip()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"launcher_start: the imports failed in {tree}")
    return seconds, usage.ru_maxrss / 1024, said == "True"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the commit to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one round (a smoke run)")
    args = ap.parse_args(argv)
    trees = {"before": args.before.resolve(), "after": REPO}
    runs: dict[str, list[tuple[float, float, bool]]] = {name: [] for name in trees}
    for _ in range(1 if args.quick else args.rounds):
        for name, tree in trees.items():
            runs[name].append(one_start(tree))
    rows = [[name, f"{median(s for s, _, _ in r):.2f}", spread(s for s, _, _ in r),
             f"{median(m for _, m, _ in r):.0f}", "yes" if any(t for _, _, t in r) else "no"]
            for name, r in runs.items()]
    ratio = median(s for s, _, _ in runs["after"]) / median(s for s, _, _ in runs["before"])
    print("\n".join([f"Machine: {machine_line()}; {len(runs['after'])} round(s), interleaved", "",
                     table(["checkout", "median s", "range s", "peak MB", "imports torch"], rows), "",
                     f"after / before: {ratio:.2f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
