"""Prediction quality on the real sample, side by side, on dist_lc's folds, per minute of the machine.

    python benchmarks/quality.py --work /tmp/dq --fold-minutes 5 [--methods baseline,gbm,stack,cv,joint]
    python benchmarks/quality.py --work /tmp/dq --methods cv --fold-minutes 2 4 6     # a curve
    python benchmarks/quality.py --work /tmp/dq --ablate --fold-minutes 3 --folds 0 1 \\
        --variant "no second stage: cv.second_stage=false" --variant "validate every epoch: train.val_from=0"
    python benchmarks/quality.py --quick --work /tmp/dq-quick      # the test suite's smoke run

Methods, every one scored with ``dist_lc.metrics`` on the same 5 folds (the packed sample's):

- ``baseline``: each out-of-fold tile predicted by the mean proportions of its training folds;
- ``gbm``: the per-pixel gradient-boosting reference (``benchmarks/pixel_gbm.py``): LightGBM on
  30 per-pixel features from a class-balanced pixel sample, the log sampling rates subtracted;
- ``stack``: the strongest classical pipeline: that GBM's out-of-fold tile means corrected by the
  same tile-level second stage the product fits (``dist_lc.second_stage``: boosted trees started
  from the log-proportions, with the cheap tile features), cross-fitted;
- ``cv``: the product itself, ``dist-lc cv`` of ``--recipe`` (default ``configs/recommended.yaml``)
  on the local executor, 2 DDP ranks per fold, ``train.time_limit = --fold-minutes``: its
  report's out-of-fold score, calibrated and second-stage scores (all cross-fitted), and the wall
  time of the whole command, overhead included. Several ``--fold-minutes`` give a curve;
- ``joint``: each ``cv`` run's plain out-of-fold tiles corrected by the same second stage with the
  pixel GBM's log-proportions added to its inputs (both models' views of a tile), cross-fitted; it
  costs the GBM's time on top of the cv. ``--cv-from JSON`` takes the cv predictions of an earlier
  run instead of running ``dist-lc cv``.

``--ablate``: ``dist-lc cv`` of the recipe, then of each ``--variant`` (``name: key=value ...``),
one change at a time at the same budget. The noise of a score is shown as the standard deviation
of a bootstrap over the scored tiles (the same resampling for every method of a run).

Results: a markdown table on stdout and in ``--md`` (default ``WORK/quality.md``), every
prediction in ``--json`` (default ``WORK/quality.json``). ``--include JSON`` keeps the methods of an
earlier run that this one does not compute (e.g. the 50-minute GBM).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pixel_gbm  # noqa: E402
from common import REPO, SAMPLE_SRC, cv_command, ensure_shards, log, machine_line, table  # noqa: E402

from dist_lc import calibration, second_stage, tile_features  # noqa: E402
from dist_lc.metrics import EPSILON, best_constant, has_scored_class, kl_per_sample, scored_proportions  # noqa: E402
from lc_common.tiles import CLASS_NAMES  # noqa: E402

CLASSES = list(CLASS_NAMES)
BOOTSTRAP = 1000


# ----------------------------------------------------------------------------- scores

def per_tile(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    keep = has_scored_class(truth)
    out = np.full(len(truth), np.nan)
    out[keep] = kl_per_sample(truth[keep], pred[keep])
    return out


class Scorer:
    """Scores predictions (keyed by tile id) against the truth; bootstrap noise with shared resamples."""

    def __init__(self, truth: pd.DataFrame, folds: pd.Series, seed: int = 0):
        self.truth, self.folds = truth, folds
        self.draws = np.random.default_rng(seed).integers(0, len(truth), (BOOTSTRAP, len(truth)))

    def __call__(self, pred: pd.DataFrame) -> dict:
        ids = self.truth.index
        tiles = per_tile(self.truth.to_numpy(), pred.loc[ids, CLASSES].to_numpy())
        boot = np.nanmean(tiles[self.draws], axis=1)
        by_fold = {int(k): float(np.nanmean(tiles[(self.folds == k).to_numpy()])) for k in sorted(set(self.folds))}
        return {"oof": float(np.nanmean(tiles)), "noise": float(boot.std()), "per_fold": by_fold}


# ----------------------------------------------------------------------------- methods

def method_baseline(tiles, truth, folds) -> pd.DataFrame:
    rows = {}
    for k in sorted(set(folds)):
        prior = best_constant(truth[folds != k])
        rows.update({i: prior for i in truth.index[folds == k]})
    return pd.DataFrame.from_dict(rows, orient="index", columns=CLASSES)


def method_gbm(tiles, args) -> tuple[pd.DataFrame, dict]:
    rows, info = {}, {}
    for k in sorted(set(args.folds)):
        log(f"pixel GBM fold {k}: {args.gbm_pixels} px, {args.gbm_rounds} rounds")
        started = time.monotonic()
        val, corrected, _, stats = pixel_gbm.fit_fold(tiles, k, pixels=args.gbm_pixels, rounds=args.gbm_rounds,
                                                      stride=args.gbm_stride, threads=args.gbm_threads)
        info[k] = {**stats, "wall_s": time.monotonic() - started}
        rows.update({tiles.keys[i]: p for i, p in zip(val, corrected)})
    return pd.DataFrame.from_dict(rows, orient="index", columns=CLASSES), info


def gbm_from(path: Path) -> tuple[pd.DataFrame, float, str]:
    """The pixel GBM's out-of-fold tile predictions saved by an earlier run of this script (either layout)."""
    record = json.loads(path.read_text())
    if isinstance(record, list):     # the layout of the first quality runs: one entry per method
        entry = next(r for r in record if r.get("kind") == "gbm")
        wall = sum(f["wall_s"] for f in entry["folds_info"].values())
        return pd.DataFrame.from_dict(entry["oof_tiles"], orient="index", columns=CLASSES), wall, entry["name"]
    row = next(r for r in record["rows"] if r["method"].startswith("pixel GBM") and "+" not in r["method"])
    preds = pd.DataFrame.from_dict(record["predictions"]["gbm"], orient="index")[CLASSES]
    return preds, row["wall_min"] * 60, row["method"]


def features_of(tiles) -> pd.DataFrame:
    keys, values = tile_features.features((k, im, True) for k, im in zip(tiles.keys, tiles.images))
    return pd.DataFrame(values, index=keys)


def method_stack(gbm: pd.DataFrame, truth, folds, features) -> dict:
    ids = truth.index
    y, p, f = truth.to_numpy(), gbm.loc[ids, CLASSES].to_numpy(), features.loc[ids].to_numpy()
    out = {"calibrated": calibration.cross_fitted(y, p, folds.to_numpy()),
           "second stage": second_stage.cross_fitted(y, p, f, folds.to_numpy())}
    return {k: pd.DataFrame(v, index=ids, columns=CLASSES) for k, v in out.items()}


def method_joint(unet: pd.DataFrame, gbm: pd.DataFrame, truth, folds, features) -> pd.DataFrame:
    """The U-Net path's out-of-fold tiles corrected by the second stage with the pixel GBM's
    log-proportions among its inputs (both models' views of each tile), cross-fitted."""
    ids = truth.index
    gbm_log = np.log(scored_proportions(gbm.loc[ids, CLASSES].to_numpy()) + EPSILON)
    inputs = np.column_stack([features.loc[ids].to_numpy(), gbm_log])
    fixed = second_stage.cross_fitted(truth.to_numpy(), unet.loc[ids, CLASSES].to_numpy(), inputs, folds.to_numpy())
    return pd.DataFrame(fixed, index=ids, columns=CLASSES)


def cv_from(path: Path) -> dict[str, tuple[pd.DataFrame, float | None]]:
    """The plain out-of-fold predictions of each ``dist-lc cv`` of an earlier run's JSON, with its wall."""
    record = json.loads(path.read_text())
    walls = {r["method"]: r["wall_min"] * 60 if r.get("wall_min") else None for r in record["rows"]}
    out = {}
    for key, pred in record["predictions"].items():
        if key.startswith("dist-lc cv") and key.endswith(" / plain"):
            label = key[: -len(" / plain")]
            frame = pd.DataFrame.from_dict(pred, orient="index")[CLASSES]
            frame.index = frame.index.astype(str)
            out[label] = frame, walls.get(label)
    if not out:
        raise SystemExit(f"{path}: no dist-lc cv predictions in it")
    return out


def run_cv(args, shards: Path, out: Path, minutes: float, sets: list[str]) -> dict:
    """``dist-lc cv`` of the recipe at ``minutes`` per fold: its wall time and its report."""
    cmd = cv_command(args.recipe, out, shards, minutes, args.folds, args.nproc, [*args.set, *sets])
    log(f"dist-lc cv {args.recipe.name} at {minutes:g} min per fold {' '.join(sets)} → {out}")
    started = time.monotonic()
    log_file = out.parent / f"{out.name}.log"     # not with_suffix: "cv-5.4" has a dot
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    wall = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log_file}")
    report = json.loads((out / "report.json").read_text())
    read = {name: pd.read_csv(out / f, dtype={"sample_id": str}).set_index("sample_id")
            for name, f in (("plain", "oof.csv"), ("calibrated", "oof_calibrated.csv"),
                            ("second stage", "oof_second_stage.csv")) if (out / f).exists()}
    folds = report["folds"]
    return {"wall_s": wall, "report": {k: report.get(k) for k in ("oof_kl", "mean_kl", "calibration",
                                                                   "second_stage", "submission")},
            "epochs": [f["epochs_done"] for f in folds], "timelines": [f.get("timeline") for f in folds],
            "predictions": read}


# ----------------------------------------------------------------------------- the run

def rows_of(name: str, preds: dict, scorer: Scorer, wall: float | None, extra: str = "") -> list[dict]:
    return [{"method": f"{name}" + ("" if variant == "plain" else f" + {variant}"), **scorer(pred),
             "wall_min": wall / 60 if wall else None, "note": extra} for variant, pred in preds.items()]


def render(rows: list[dict], args, started: str) -> str:
    folds = sorted(rows[0]["per_fold"]) if rows else []
    lines = [f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
             f"Machine: {machine_line()}; started {started}  ",
             f"Scores: out-of-fold KL over the {len(folds)} folds' tiles (lower is better), ± the standard deviation "
             f"of a bootstrap over tiles ({BOOTSTRAP} resamples); every correction cross-fitted (each fold corrected "
             "by a fit on the others).", ""]
    body = [[r["method"], *(f"{r['per_fold'][k]:.4f}" for k in folds), f"**{r['oof']:.4f}** ± {r['noise']:.4f}",
             f"{r['wall_min']:.1f}" if r["wall_min"] else "", r["note"]] for r in rows]
    lines.append(table(["method", *(f"fold {k}" for k in folds), "oof KL", "wall min", "notes"], body))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--src", type=Path, default=SAMPLE_SRC)
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--block-size", default="auto", help="lc-shard pack --block-size of the sample's pack")
    ap.add_argument("--methods", default="baseline,gbm,stack,cv,joint")
    ap.add_argument("--recipe", type=Path, default=REPO / "configs" / "recommended.yaml")
    ap.add_argument("--fold-minutes", type=float, nargs="+", default=[5.0], help="train.time_limit of each fold")
    ap.add_argument("--nproc", type=int, default=2, help="DDP ranks per fold job")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--set for every dist-lc cv")
    ap.add_argument("--ablate", action="store_true", help="the recipe, then each --variant, at the same budget")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME: KEY=VALUE ...")
    ap.add_argument("--gbm-pixels", type=int, default=1_500_000)
    ap.add_argument("--gbm-rounds", type=int, default=pixel_gbm.DEFAULT_ROUNDS)
    ap.add_argument("--gbm-stride", type=int, default=pixel_gbm.DEFAULT_STRIDE, help="prediction pixel stride")
    ap.add_argument("--gbm-threads", type=int, default=1)
    ap.add_argument("--gbm-from", type=Path, help="take the pixel GBM's predictions from an earlier run's JSON "
                    "(it costs ~50 minutes) and fit the stack on them")
    ap.add_argument("--cv-from", type=Path, help="score the dist-lc cv predictions of an earlier run's JSON "
                    "(with --methods joint: fit the joint second stage on them) instead of running cv")
    ap.add_argument("--include", type=Path, help="keep the methods of an earlier run's JSON not computed here")
    ap.add_argument("--md", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--quick", action="store_true", help="2 folds, tiny budgets and models, one rank a fold "
                    "(a smoke run)")
    args = ap.parse_args(argv)
    if args.quick:
        args.folds, args.fold_minutes, args.gbm_pixels, args.gbm_rounds, args.gbm_stride = [0, 1], [0.1], 20_000, 10, 8
        args.nproc = 1   # the plumbing: DDP folds are the other benchmarks' and the suite's
        args.set += ["data.crop=32", "model.filters=8", "model.upconv_filters=8", "data.workers=0"]
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    shards = ensure_shards(args.work / "shards", args.src, args.block_size)
    tiles = pixel_gbm.load_tiles(shards)
    keep = np.isin(tiles.folds, args.folds)
    truth = pd.DataFrame(tiles.props[keep], index=np.asarray(tiles.keys)[keep], columns=CLASSES)
    folds = pd.Series(tiles.folds[keep], index=truth.index)
    scorer = Scorer(truth, folds)
    methods = args.methods.split(",")
    rows, saved, unet_runs = [], {}, {}
    if "baseline" in methods:
        rows += rows_of("mean distribution", {"plain": method_baseline(tiles, truth, folds)}, scorer, None)
    if args.gbm_from:
        gbm, wall, name = gbm_from(args.gbm_from)
        gbm.index = gbm.index.astype(str)
        saved["gbm"] = gbm
        preds = {"plain": gbm, **method_stack(gbm, truth, folds, features_of(tiles))}
        rows += rows_of(name.split(",")[0] + f" ({args.gbm_from.name})", preds, scorer, wall,
                        "pixel model from an earlier run; second stage fitted in this one")
    elif "gbm" in methods or "stack" in methods:
        started_gbm = time.monotonic()
        gbm, info = method_gbm(tiles, args)
        wall = time.monotonic() - started_gbm
        saved["gbm"] = gbm
        preds = {"plain": gbm}
        if "stack" in methods:
            preds.update(method_stack(gbm, truth, folds, features_of(tiles)))
        rows += rows_of(f"pixel GBM ({args.gbm_pixels / 1e6:g} M px)", preds, scorer, wall)
    if args.ablate:
        variants = [("recipe", [])] + [(v.split(":", 1)[0].strip(), v.split(":", 1)[1].split()) for v in args.variant]
        for minutes in args.fold_minutes:
            for name, sets in variants:
                run = run_cv(args, shards, args.work / f"cv-{minutes:g}-{name.replace(' ', '_')}", minutes, sets)
                label = f"{name} ({minutes:g} min/fold)"
                rows += rows_of(label, run["predictions"], scorer, run["wall_s"], " ".join(f"`{s}`" for s in sets))
                saved.update({f"{label} / {v}": pred for v, pred in run["predictions"].items()})
    elif args.cv_from:
        for label, (plain, wall) in cv_from(args.cv_from).items():
            label = f"{label} ({args.cv_from.name})"
            rows += rows_of(label, {"plain": plain}, scorer, wall)
            unet_runs[label] = plain, wall
    elif "cv" in methods:
        for minutes in args.fold_minutes:
            run = run_cv(args, shards, args.work / f"cv-{minutes:g}", minutes, [])
            outside = [1 - t["epochs_s"] / t["job_s"] for t in run["timelines"] if t]
            label = f"dist-lc cv {args.recipe.name} ({minutes:g} min/fold)"
            rows += rows_of(label, run["predictions"], scorer, run["wall_s"],
                            f"epochs {run['epochs']}; outside epochs {np.mean(outside):.0%} of a job")
            saved.update({f"{label} / {v}": pred for v, pred in run["predictions"].items()})
            unet_runs[label] = run["predictions"]["plain"], run["wall_s"]
    if "joint" in methods:
        if "gbm" not in saved:
            raise SystemExit("--methods joint needs the pixel GBM's predictions: add gbm, or --gbm-from JSON")
        for label, (plain, wall) in unet_runs.items():
            joint = method_joint(plain, saved["gbm"], truth, folds, features_of(tiles))
            rows += rows_of(f"{label} + second stage with the pixel GBM's tile means", {"plain": joint}, scorer,
                            None, "cross-fitted; costs the pixel GBM's time on top of the cv")
            saved[f"{label} / joint"] = joint
    if args.include and args.include.exists():
        earlier = json.loads(args.include.read_text())
        have = {r["method"] for r in rows}
        rows += [r for r in earlier["rows"] if r["method"] not in have]
    text = render(rows, args, started)
    print(text)
    (args.md or args.work / "quality.md").write_text(text)
    record = {"machine": machine_line(), "started": started, "argv": sys.argv[1:], "rows": rows,
              "predictions": {k: v.to_dict(orient="index") for k, v in saved.items()}}
    (args.json or args.work / "quality.json").write_text(json.dumps(record, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
