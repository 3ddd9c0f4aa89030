"""``dist-lc`` / ``python -m dist_lc``: one sub-command per job; each lives in its own module.

Exit status 0 on success, 2 on bad input (one line ``error: <message>`` on stderr), 1 when a job
failed (training stopped, a fold failed).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from lc_common.errors import INTERRUPTED, InputError, OneLineArgumentParser, WriteError, ended_as_told, print_error

from .config import LauncherConfig, TrainConfig, choices
from .tune import FOLD_ORDERS, PRUNERS, SAMPLERS

# the config declares these choices; the options that pick the same things offer the same ones
DEVICES = choices(TrainConfig, "device")
EXECUTORS = choices(LauncherConfig, "executor")
PROBABILITY_TYPES = ("uint8", "float32")   # dist-lc map --probabilities: uint8 is probability × 255


def whole_number(minimum: int):
    """An argparse type: an integer of at least ``minimum``, refused in one line otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {'at least 1' if minimum == 1 else '0 or more'}, got {value}")
        return value
    return parse


positive_int, count = whole_number(1), whole_number(0)


def _config_options(p, what: str) -> None:
    p.add_argument("--config", metavar="YAML", help=f"recipe (configs/*.yaml) {what}; built-in defaults when omitted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.epochs=3 (YAML value; repeatable; after the recipe)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key, its help and default) and exit")


def _train(sub):
    p = sub.add_parser("train", help="train a model (also under torchrun / srun)")
    _config_options(p, "to train")
    p.add_argument("--run-dir", metavar="DIR", help="run folder; one holding checkpoints/last.pt is resumed "
                   "(default: runs/<recipe>-<launch id>)")
    return "dist_lc.train"


def _predict(sub):
    p = sub.add_parser("predict", help="submission CSV from one or more checkpoints")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint(s) (best.pt / last.pt); several are averaged (an ensemble)")
    tiles = p.add_mutually_exclusive_group(required=True)
    tiles.add_argument("--shards", metavar="DIR|URL", help="shard folder or URL (lc-shard pack)")
    tiles.add_argument("--images", metavar="DIR", help="a folder of <id>.tif tiles as the challenge ships them "
                       "(e.g. DATA/test/images), instead of shards; other imagery: dist-lc map, which checks "
                       "bands, offset and no_data")
    p.add_argument("--split", help="with --shards: test, train or fold:K (default: test); a checkpoint that "
                                   "trained on the folds asked for is warned about (in-sample)")
    p.add_argument("--out", required=True, metavar="CSV", help="submission CSV to write (sample_id + 10 classes)")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations of every tile (8× the time)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="tiles per forward pass (default: 16)")
    p.add_argument("--workers", type=count, default=2, metavar="N",
                   help="DataLoader worker processes per rank (default: 2; 0: read in the main process)")
    p.add_argument("--device", default=TrainConfig.device, choices=DEVICES,
                   help="device (default: auto, CUDA when visible)")
    return "dist_lc.predict"


def _eval(sub):
    p = sub.add_parser("eval", help="score a submission CSV against ground truth (the challenge's KL)")
    p.add_argument("--gt", required=True, metavar="CSV", help="ground-truth CSV (train_labels.csv layout)")
    p.add_argument("--pred", required=True, metavar="CSV", help="predicted CSV (submission layout)")
    p.add_argument("--out", metavar="JSON", help="also write the score and per-class contributions as JSON")
    return "dist_lc.evaluate"


def _map(sub):
    p = sub.add_parser("map", help="land-cover maps (GeoTIFF, quicklook, proportions) of scenes of any size")
    p.add_argument("scenes", nargs="+", metavar="SCENE", help="GeoTIFF scene(s) with the 4 bands R, G, B, NIR "
                   "(uint16), or folders of them")
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="checkpoint(s); several are averaged (an ensemble)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--overlap", type=count, default=64, metavar="PX",
                   help="pixels by which neighbouring 256² windows overlap, blended (default: 64)")
    p.add_argument("--tta", action="store_true", help="average the 8 flips/rotations of every window (8× the time)")
    p.add_argument("--probabilities", choices=PROBABILITY_TYPES,
                   help="also write the per-class probabilities (uint8: × 255; float32 holds float16 precision, "
                        "which the ranks exchange) as a GeoTIFF (default: none)")
    p.add_argument("--aoi", metavar="AREA", help="an area to report the proportions of: x0,y0,x1,y1 in the "
                   "scene's CRS, lonlat:x0,y0,x1,y1, or a GeoJSON polygon file")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="windows per forward pass (default: 8)")
    p.add_argument("--device", default=TrainConfig.device, choices=DEVICES,
                   help="device (default: auto, CUDA when visible)")
    return "dist_lc.mapping"


def _cv(sub):
    p = sub.add_parser("cv", help="cross-validation (and grids) as parallel jobs through submitit")
    _config_options(p, "of every fold")
    p.add_argument("--out", required=True, metavar="DIR", help="CV folder (new, or an earlier one with --resume)")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="where the jobs run (default: launcher.executor of the recipe)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis: every combination of the axes is a grid point (repeatable)")
    p.add_argument("--resume", action="store_true", help="resubmit only the jobs of --out that did not finish")
    p.add_argument("--no-wait", action="store_true", help="submit and return; `dist-lc report` later")
    return "dist_lc.cv.launch"


def _tune(sub):
    p = sub.add_parser("tune", help="hyper-parameter search (Optuna): each trial a cross-validation run as jobs")
    _config_options(p, "that every trial starts from")
    p.add_argument("--space", metavar="YAML", help="the search space: config keys and a distribution each "
                   "(configs/spaces/recommended.yaml)")
    p.add_argument("--out", metavar="DIR", help="tune folder (new, or an earlier one with --resume)")
    p.add_argument("--trials", type=positive_int, metavar="N", help="trials of the whole study, every state "
                   "counted (default: 20; with --resume: raise it to run more)")
    p.add_argument("--parallel", type=positive_int, metavar="P", help="jobs running at once, all trials together "
                   "(default: launcher.max_parallel, else what the executor runs at once, else the folds)")
    p.add_argument("--executor", choices=EXECUTORS, help="where the jobs run (default: launcher.executor of the recipe)")
    p.add_argument("--folds", metavar="K,K", help="the folds of every trial (default: cv.folds of the recipe)")
    p.add_argument("--sampler", choices=SAMPLERS, help="how trials are drawn (default: tpe; cmaes: numeric spaces)")
    p.add_argument("--pruner", choices=PRUNERS, help="what stops hopeless trials early (default: median)")
    p.add_argument("--fold-order", choices=FOLD_ORDERS, help="a trial's folds one after another, pruned between "
                   "them, or all at once (default: sequential)")
    p.add_argument("--seed", type=count, metavar="S", help="the sampler's seed (default: 0)")
    p.add_argument("--pruner-startup", type=count, metavar="N", help="median: trials finished before any is "
                   "pruned (default: 4)")
    p.add_argument("--pruner-warmup", type=count, metavar="N", help="the first epochs of every fold, never judged "
                   "by the pruner (default: a quarter of a fold's epochs)")
    p.add_argument("--resume", action="store_true", help="continue the study of --out")
    p.add_argument("--report", metavar="DIR", help="only rebuild DIR's report.md, report.json, best.yaml and plots")
    return "dist_lc.tune.launch"


def _cv_array(sub):
    p = sub.add_parser("cv-array", help="the steps of slurm/cv_array.sbatch (prepare the CV folder; run a fold)")
    steps = p.add_subparsers(dest="step", required=True)
    prep = steps.add_parser("prepare", help="write cv.json for a one-point CV, or check an existing one")
    prep.add_argument("--config", required=True, metavar="YAML", help="recipe of every fold")
    prep.add_argument("--cv-dir", required=True, metavar="DIR", help="CV folder")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    fold = steps.add_parser("fold", help="train and predict one fold (every srun task runs it)")
    fold.add_argument("--cv-dir", required=True, metavar="DIR", help="CV folder written by `prepare`")
    fold.add_argument("--fold", required=True, type=count, metavar="K", help="the fold (the array task id)")
    return "dist_lc.cv.array"


def _report(sub):
    p = sub.add_parser("report", help="(re)build the report of a CV folder")
    p.add_argument("cv_dir", metavar="CVDIR", help="CV folder written by `dist-lc cv` or cv_array.sbatch")
    return "dist_lc.cv.report"


def _synth(sub):
    p = sub.add_parser("synth", help="write a realistic synthetic dataset in the challenge layout")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create (train/, test/, train_labels.csv)")
    p.add_argument("--train", type=count, default=150, metavar="N", help="train tiles with masks (default: 150)")
    p.add_argument("--test", type=count, default=24, metavar="N", help="test tiles (default: 24)")
    p.add_argument("--seed", type=count, default=0, metavar="S", help="random seed (default: 0)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="processes drawing tiles (default: the cores this process may use)")
    return "dist_lc.synth.generate"


def _demo(sub):
    p = sub.add_parser("demo", help="the whole pipeline end to end on synthetic (or given) data")
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="output folder, replaced by the next demo (default: demo_out)")
    p.add_argument("--data", metavar="DIR", help="a challenge folder to use instead of synthetic data")
    p.add_argument("--executor", choices=EXECUTORS,
                   help="where the folds run (default: slurm if a cluster answers, else local)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo's recipe (configs/demo.yaml), e.g. train.epochs=5")
    return "dist_lc.demo"


COMMANDS = (_train, _predict, _eval, _map, _cv, _tune, _cv_array, _report, _synth, _demo)


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = OneLineArgumentParser(prog="dist-lc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for add in COMMANDS:
        module = add(sub)
        modules[next(reversed(sub.choices))] = module
    return parser, modules


def main(argv=None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    return ended_as_told(run_command(modules[args.command], args), argv)


def run_command(module: str, args) -> int:
    try:
        return int(importlib.import_module(module).run(args) or 0)
    except InputError as exc:
        print_error(exc)
        return 2
    except WriteError as exc:   # not the user's input: a full disk, a quota, a read-only folder
        print_error(exc)
        return 1
    except KeyboardInterrupt:   # Ctrl-C where no handler of the command's took it: one line, not a traceback
        hint = "; last.pt holds the last whole epoch: the same command resumes there" if args.command == "train" else ""
        print(f"dist-lc {args.command}: stopped by SIGINT (Ctrl-C){hint}", file=sys.stderr, flush=True)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
