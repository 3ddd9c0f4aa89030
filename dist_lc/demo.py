"""``dist-lc demo``: the whole pipeline on a built-in synthetic dataset (or a real challenge folder).

synth → pack (3 folds) → 3-fold cross-validation, each fold a 2-process DDP job (local processes,
or the local Slurm cluster when one answers) → report, out-of-fold and ensemble submission → the
report's summary.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lc_common.errors import InputError
from shard_tools.pack import pack

from . import cli
from .config import load_config
from .cv import report
from .cv.executors import slurm_problem
from .cv.launch import check_launcher
from .cv.plan import check_fold_list
from .synth.generate import generate

MARKER = ".dist_lc_demo"
FOLDS = 3
OWN_KEYS = {"data.shards": "give a challenge folder with --data", "launcher.executor": "use --executor"}
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def prepare_out(out: Path) -> None:
    """A new folder, or the folder of an earlier demo (replaced); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise InputError(f"{out}: holds files that are not an earlier demo's; choose another --out")
        print(f"replacing the earlier demo in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `dist-lc demo`; the whole folder is replaced by the next demo\n")


def check_challenge_folder(data: Path) -> None:
    for sub in ("train/images", "train/masks"):
        if not (data / sub).is_dir():
            raise InputError(f"{data}: not a challenge folder (no {sub}/; expected train/images, "
                             "train/masks, optionally test/images)")


def recipe_path() -> Path:
    if not RECIPE.is_file():  # installed without the repository's configs/
        raise InputError(f"{RECIPE}: the demo recipe is missing; run the demo from a clone of the repository")
    return RECIPE


def check_sets(recipe: Path, sets: list[str], executor: str) -> None:
    """The recipe with the user's --set, checked as `dist-lc cv` checks it (the folds against the
    demo's 3), before anything is written; the two keys the demo sets itself are refused."""
    for item in sets:
        key = item.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise InputError(f"--set {key}: the demo sets it itself; {OWN_KEYS[key]}")
    cfg = load_config(recipe, [*sets, f"launcher.executor={executor}"])
    check_launcher(cfg, executor)
    check_fold_list(cfg.cv.folds, FOLDS, f"is not one of the demo's folds 0..{FOLDS - 1}")


def pick_executor(requested: str | None) -> str:
    if requested:
        return requested
    return "local" if slurm_problem() else "slurm"


def run(args) -> int:
    started = time.monotonic()
    out = Path(args.out)
    data = Path(args.data) if args.data else None
    if data is not None:
        check_challenge_folder(data)
    recipe = recipe_path()
    executor = pick_executor(args.executor)
    check_sets(recipe, args.set, executor)
    prepare_out(out)
    if data is None:
        print("1/4 synthesising a challenge-like dataset")
        data = generate(out / "data", n_train=150, n_test=24, seed=0, progress=True)
    else:
        print(f"1/4 no synthesis: the challenge's tiles of --data {data}")
    print(f"2/4 packing {data} into shards (3 folds)")
    pack(data, out / "shards", folds=FOLDS, seed=0, samples_per_shard=32, progress=True)
    print(f"3/4 3-fold cross-validation, each fold a 2-process DDP job ({executor} executor)")
    cv_dir = out / "cv"
    code = cli.main(["cv", "--config", str(recipe), "--out", str(cv_dir), "--executor", executor,
                     "--set", f"data.shards={out / 'shards'}", *[a for kv in args.set for a in ("--set", kv)]])
    report_path = cv_dir / "report.json"
    if not report_path.is_file():
        print("the cross-validation did not produce a report; see the messages above")
        return code or 1
    print("4/4 report")
    print(f"\ndist_lc demo finished in {(time.monotonic() - started) / 60:.1f} min\n")
    print(report.summary(json.loads(report_path.read_text())))
    return code
