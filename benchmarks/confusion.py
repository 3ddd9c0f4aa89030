"""Validation's pixel metrics on the CPU: the most probable scored class per pixel
(``dist_lc.confusion.scored_argmax``: channel planes compared) and a batch's confusion matrix
(``confusion``: unscored pixels in an extra bin, counted by ``index_add_``) as shipped, against the
code before (torch's ``argmax`` across the scored channels picked by index; the scored pixels picked
by a boolean index, counted by ``bincount``), interleaved, on a validation batch of logits. Both give the same classes and counts
(checked here)::

    python benchmarks/confusion.py [--rounds 5] [--batch 32] [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, table  # noqa: E402

from dist_lc import confusion as shipped  # noqa: E402


def argmax_before(scores: torch.Tensor) -> torch.Tensor:
    return scores[:, shipped.SCORED].argmax(dim=1)


def confusion_before(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    truth = mask.long() - shipped.SCORED_CLASSES[0]
    keep = (truth >= 0) & (truth < shipped.N)
    pairs = truth[keep] * shipped.N + argmax_before(scores)[keep]
    return torch.bincount(pairs, minlength=shipped.N ** 2).reshape(shipped.N, shipped.N)


def seconds(fn, *args, repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn(*args)
    return (time.perf_counter() - started) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a rank of a 2-process run has 1)")
    ap.add_argument("--quick", action="store_true", help="one round on 2 tiles (a smoke run)")
    args = ap.parse_args(argv)
    rounds, batch = (1, 2) if args.quick else (args.rounds, args.batch)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, 10, 256, 256, generator=gen)
    mask = torch.randint(0, 10, (batch, 256, 256), generator=gen, dtype=torch.uint8)
    variants = {"argmax": {"before": (argmax_before, scores), "shipped": (shipped.scored_argmax, scores)},
                "confusion": {"before": (confusion_before, mask, scores),
                              "shipped": (shipped.confusion, mask, scores)}}
    for what, pair in variants.items():
        (f, *a), (g, *b) = pair.values()
        if not torch.equal(f(*a), g(*b)):
            raise SystemExit(f"confusion: the shipped {what} differs from the one before")
    timings = {(what, name): [] for what, pair in variants.items() for name in pair}
    for _ in range(rounds):
        for what, pair in variants.items():
            for name, (fn, *fn_args) in pair.items():
                timings[what, name].append(seconds(fn, *fn_args, repeat=3))
    print(f"Machine: {machine_line()}; batch {batch} × 10 × 256², {args.threads} thread(s), "
          f"{rounds} round(s), interleaved\n")
    rows = [[what, name, f"{statistics.median(t) * 1000:.0f}"] for (what, name), t in timings.items()]
    print(table(["of a batch", "variant", "median ms"], rows))
    for what in variants:
        ratio = statistics.median(timings[what, "shipped"]) / statistics.median(timings[what, "before"])
        print(f"\n{what}: shipped / before: {ratio:.2f}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
