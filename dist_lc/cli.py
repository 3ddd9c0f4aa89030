"""``dist-lc`` / ``python -m dist_lc``: one sub-command per job; each lives in its own module."""
from __future__ import annotations

import argparse
import importlib
import sys

from shard_tools.errors import InputError


def _train(sub):
    p = sub.add_parser("train", help="train a model (also under torchrun / srun)")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--run-dir", help="run folder; a folder holding checkpoints/last.pt is resumed")
    return "dist_lc.train"


def _predict(sub):
    p = sub.add_parser("predict", help="submission CSV from one or more checkpoints")
    p.add_argument("--checkpoint", nargs="+", required=True, help="checkpoint(s); several are averaged")
    p.add_argument("--shards", required=True, help="shard folder")
    p.add_argument("--split", default="test", help="test | train | fold:K")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return "dist_lc.predict"


def _eval(sub):
    p = sub.add_parser("eval", help="score a submission CSV against ground truth")
    p.add_argument("--gt", required=True, help="ground-truth CSV (train_labels.csv layout)")
    p.add_argument("--pred", required=True, help="predicted CSV")
    p.add_argument("--out", help="write the score as JSON")
    return "dist_lc.evaluate"


def _cv(sub):
    p = sub.add_parser("cv", help="cross-validation (and grids) as parallel jobs through submitit")
    p.add_argument("--config", help="YAML recipe")
    p.add_argument("--out", required=True, help="CV folder")
    p.add_argument("--executor", choices=("slurm", "local"), help="overrides launcher.executor")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis")
    p.add_argument("--resume", action="store_true", help="resubmit only the jobs that did not finish")
    p.add_argument("--no-wait", action="store_true", help="submit and return; `dist-lc report` later")
    return "dist_lc.cv"


def _report(sub):
    p = sub.add_parser("report", help="(re)build the report of a CV folder")
    p.add_argument("cv_dir")
    return "dist_lc.report"


def _synth(sub):
    p = sub.add_parser("synth", help="write a realistic synthetic dataset in the challenge layout")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=150)
    p.add_argument("--test", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    return "dist_lc.synth.generate"


def _demo(sub):
    p = sub.add_parser("demo", help="the whole pipeline end to end on synthetic (or given) data")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--data", help="a challenge folder instead of synthetic data")
    p.add_argument("--executor", choices=("slurm", "local"), help="default: slurm if a cluster answers")
    return "dist_lc.demo"


COMMANDS = (_train, _predict, _eval, _cv, _report, _synth, _demo)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="dist-lc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for add in COMMANDS:
        module = add(sub)
        modules[next(reversed(sub.choices))] = module
    return parser, modules


def main(argv=None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(modules[args.command]).run(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
