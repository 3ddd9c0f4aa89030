"""Prediction quality on the real sample, side by side, on dist_lc's folds (issue 9).

Full run (5 folds; 10 minutes of training per fold for each U-Net recipe; a 1.5 M-pixel sample and
300 rounds for the gradient-boosting reference)::

    python benchmarks/quality.py --folds 0 1 2 3 4 --minutes 10 --gbm-pixels 1500000 \
        --md docs/BENCHMARKS.md --json /tmp/dist_lc_quality/main.json

Expected length on the 2-core CPU machine: pixel GBM ~10 min per fold (sample 10 s, training
6.5 min, prediction 3 min, measured at load 5 with 1 thread), each U-Net recipe 10 min + prediction
per fold, plus a 2-epoch probe for the cosine recipe: about 2 h 45 min when the machine is quiet.
Longer under load: the trainer always completes its first epoch, and one epoch of
``configs/benchmark.yaml`` (full 256² tiles, width 64) ran at 0.17 img/s at load 11 (~20 min).
An interrupted run continues with ``--reuse`` (finished U-Net folds are kept; the GBM is refitted).

Short run (one fold, one minute per U-Net, a 200 k-pixel GBM sample)::

    python benchmarks/quality.py --folds 0 --minutes 1 --gbm-pixels 200000

(add ``--gbm-rounds 100 --gbm-stride 4`` to cut the GBM from ~6 to ~2 min; ``--recipes
configs/recommended.yaml`` to leave out the slow benchmark recipe; ``--methods baseline gbm`` for
the classical methods only).

Ablation (each variant of a base recipe under the same budget; the effect of each change on the
out-of-fold score; without ``--variant`` the built-in list ``DEFAULT_VARIANTS`` is run; variants
that only set ``predict.*`` reuse the base runs)::

    python benchmarks/quality.py --ablate configs/recommended.yaml --folds 0 1 2 3 4 --minutes 10 \
        --md docs/BENCHMARKS.md [--variant "no KL term: loss.kl_weight=0" --variant "TTA: predict.tta=true"]

What it compares, every method scored with ``dist_lc.metrics`` (the project's only score):

- **mean distribution**: each out-of-fold tile predicted as the mean class proportions of the
  training folds' tiles;
- **pixel GBM** (``benchmarks/pixel_gbm.py``): LightGBM on 30 per-pixel features, a class-balanced
  pixel sample from the training folds, the log sampling rates subtracted from the logits; also shown
  without that correction (same model);
- **U-Net recipes** (``--recipes``, default ``configs/benchmark.yaml configs/recommended.yaml``),
  trained by ``python -m dist_lc train`` in a subprocess, one fold at a time, each with
  ``train.time_limit = --minutes``; the out-of-fold tiles are predicted from ``last.pt`` (EMA weights
  when the recipe keeps them) with ``python -m dist_lc predict``. ``best.pt`` is not used: it is
  chosen on the very fold being scored.

Epochs under a time budget (``--epochs auto``, the default): a recipe whose schedule depends on
``train.epochs`` (cosine) is first run for two epochs on the first fold (the *probe*, not counted in
the budget); the seconds per epoch (training + validation + checkpoint, from the gap between the
two epoch lines of ``train.log``) and the start-up time give
``train.epochs = floor(0.92 × (budget − start-up) / seconds per epoch)``, so that the cosine schedule
ends just inside the budget. ``train.time_limit`` stays as the hard stop (it ends at the last epoch
boundary that fits). Plateau/constant schedules keep the recipe's ``train.epochs`` and stop on time.
``--epochs recipe`` keeps every recipe's epochs; ``--epochs N`` forces N.

Launch (``--nproc N``): each U-Net training runs under ``torchrun --nproc_per_node=N`` (gloo on
CPU, one thread per rank) instead of one process; the effective batch stays the recipe's (the
micro-batch is split when the accumulation is not a multiple of N). On the 2-core machine two
ranks use the cores better than one process with two threads (docs/BENCHMARKS.md, training).

Outputs: a markdown section (``--md``, replaced in place between markers named after
``--section``), a JSON file of everything (``--json``), and the run folders under ``--work``.
Runs shorter than the full protocol are labelled "SHORT RUN" in the table's heading.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pixel_gbm  # noqa: E402
from common import REPO, SAMPLE_SRC, log, machine_line, table  # noqa: E402

from dist_lc import calibration, run_log  # noqa: E402
from dist_lc.metrics import SCORED_NAMES, kl_per_class, kl_per_sample  # noqa: E402
from shard_tools.format import CLASS_NAMES  # noqa: E402

FULL = {"folds": 5, "minutes": 10.0, "gbm_pixels": 1_500_000}
SAFETY = 0.92                       # share of the budget the cosine schedule is planned to fill
PREDICT_KEYS = ("predict.tta", "predict.checkpoint")   # pseudo-overrides handled here, not by dist_lc

DEFAULT_VARIANTS = [
    ("inverse-frequency class weights", ["loss.class_weights=inverse_frequency"]),
    ("inverse-frequency weights + prior correction",
     ["loss.class_weights=inverse_frequency", "loss.prior_correction=true"]),
    ("no proportion-KL term", ["loss.kl_weight=0"]),
    ("BatchNorm momentum 0.01 (Keras 0.99)", ["model.bn_momentum=0.01"]),
    ("GroupNorm", ["model.norm=group"]),
    ("pixels / 24356 (no standardisation)", ["data.normalize=max"]),
    ("whole 256² tiles (no crop)", ["data.crop=null"]),
    ("width 64 / upconv 96", ["model.filters=64", "model.upconv_filters=96"]),
    ("constant learning rate", ["schedule.name=constant"]),
    ("no EMA", ["train.ema_decay=null"]),
    ("TTA at prediction (8 views)", ["predict.tta=true"]),
]


# ----------------------------------------------------------------------------- helpers


def ensure_shards(shards: Path, src: Path) -> Path:
    """The sample packed with dist_lc's folds (5 folds, seed 0), once."""
    if (shards / "manifest.json").is_file():
        return shards
    log(f"packing {src} into {shards} (5 folds, seed 0)")
    subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(src), "--out", str(shards),
                    "--folds", "5", "--seed", "0"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return shards


def scored_mask(props: np.ndarray) -> np.ndarray:
    """Tiles with at least one scored pixel (a tile of no_data/clouds only has no score, as in the trainer)."""
    return props[:, 2:].sum(axis=1) > 0


def score(truth: np.ndarray, pred: np.ndarray) -> float:
    keep = scored_mask(truth)
    return float(kl_per_sample(truth[keep], pred[keep]).mean())


def fmt(x, digits=4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def split_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """(--set overrides for dist_lc, predict options) from a variant's list."""
    train, pred = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in PREDICT_KEYS:
            pred[key.strip().split(".", 1)[1]] = value.strip()
        else:
            train.append(item.strip())
    return train, pred


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name: k=v k=v"`` (or ``"k=v k=v"``, then named after its overrides)."""
    name, sep, rest = text.partition(":")
    if not sep or "=" in name:
        name, rest = text, text
    overrides = rest.split()
    if not overrides or any("=" not in o for o in overrides):
        raise SystemExit(f"--variant {text!r}: expected 'name: key=value key=value ...'")
    return name.strip(), overrides


def tag_of(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv as numbers (None where an epoch skipped validation)."""
    return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in run_log.read_metrics(run_dir)]


EPOCH_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d) epoch (\d+):")


def epoch_clock(run_dir: Path) -> list[float]:
    """Seconds of day at which each epoch's line was logged in train.log."""
    out = []
    for line in (run_dir / "train.log").read_text().splitlines():
        m = EPOCH_LINE.match(line)
        if m:
            h, mi, s, _ = map(int, m.groups())
            out.append(h * 3600 + mi * 60 + s)
    return out


def run_cmd(cmd: list[str], logfile: Path) -> float:
    """Run a dist_lc command (stdout/stderr to ``logfile``); seconds; raises with the log's tail."""
    t0 = time.monotonic()
    with open(logfile, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - t0
    if proc.returncode:
        tail = "\n".join(logfile.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return seconds


# ----------------------------------------------------------------------------- methods


def run_baseline(tiles, folds) -> dict:
    per_fold, oof = {}, {}
    for k in folds:
        val, trn = tiles.select([k]), np.flatnonzero(tiles.folds != k)
        pred = np.repeat(tiles.props[trn].mean(axis=0, keepdims=True), len(val), axis=0)
        per_fold[k] = score(tiles.props[val], pred)
        oof.update(zip(val.tolist(), pred))
    return {"name": "mean distribution of the training folds", "kind": "baseline", "per_fold": per_fold, "oof": oof}


def run_gbm(tiles, folds, args) -> list[dict]:
    corrected = {"name": f"pixel GBM, prior-corrected ({args.gbm_pixels / 1e6:g} M px)", "kind": "gbm",
                 "per_fold": {}, "oof": {}, "folds_info": {}}
    plain = {"name": "pixel GBM, no sampling correction", "kind": "gbm", "per_fold": {}, "oof": {},
             "folds_info": {}, "same_model_as_above": True}
    for k in folds:
        log(f"pixel GBM fold {k}: {args.gbm_pixels} px sample, {args.gbm_rounds} rounds")
        t0 = time.monotonic()
        val, corr, unc, stats = pixel_gbm.fit_fold(tiles, k, pixels=args.gbm_pixels, rounds=args.gbm_rounds,
                                                   stride=args.gbm_stride, threads=args.gbm_threads, seed=args.seed)
        stats["wall_s"] = time.monotonic() - t0
        for res, pred in ((corrected, corr), (plain, unc)):
            res["per_fold"][k] = score(tiles.props[val], pred)
            res["oof"].update(zip(val.tolist(), pred))
            res["folds_info"][k] = stats
        log(f"pixel GBM fold {k}: KL {corrected['per_fold'][k]:.5f} (uncorrected {plain['per_fold'][k]:.5f}), "
            f"sample {stats['sample_s']:.0f}s, train {stats['train_s']:.0f}s, predict {stats['predict_s']:.0f}s")
    return [corrected, plain]


NPROC = 1   # set from --nproc in main(): DDP ranks per U-Net training run


def train_cmd(config: Path, shards: Path, fold: int, overrides: list[str], run_dir: Path) -> list[str]:
    """``python -m dist_lc train``, under ``torchrun --nproc_per_node=NPROC`` when NPROC > 1."""
    launch = [sys.executable, "-m", "dist_lc"]
    if NPROC > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}",
                  "-m", "dist_lc"]
    cmd = [*launch, "train", "--config", str(config), "--run-dir", str(run_dir),
           "--set", f"data.shards={shards}", "--set", f"data.fold={fold}", "--set", "train.plot_every=0"]
    for o in overrides + rank_overrides(config, overrides):
        cmd += ["--set", o]
    return cmd


def rank_overrides(config: Path, overrides: list[str]) -> list[str]:
    """The micro-batch split over NPROC ranks when the recipe's accumulation is not a multiple of it
    (e.g. batch 16 = micro 16 × 1 becomes micro 8 × 2 ranks): same effective batch."""
    from dist_lc.config import load_config

    t = load_config(config, overrides).train
    accum = t.batch_size // t.micro_batch_size
    if NPROC == 1 or accum % NPROC == 0:
        return []
    if t.batch_size % NPROC:
        raise SystemExit(f"{config}: train.batch_size {t.batch_size} cannot be split over --nproc {NPROC}")
    return [f"train.micro_batch_size={t.batch_size // NPROC}"]


def probe_epochs(config: Path, shards: Path, fold: int, overrides: list[str], minutes: float, work: Path) -> dict:
    """Two epochs without time limit: seconds per epoch and start-up → epochs filling the budget."""
    run_dir = work / "probe"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    wall = run_cmd(train_cmd(config, shards, fold, overrides + ["train.epochs=2", "train.time_limit=null"], run_dir),
                   run_dir / "stdout.log")
    clock = epoch_clock(run_dir)
    per_epoch = (clock[1] - clock[0]) if len(clock) == 2 and clock[1] > clock[0] else wall / 2
    startup = max(wall - 2 * per_epoch, 0.0)
    epochs = max(1, int(SAFETY * (minutes * 60 - startup) / per_epoch))
    info = {"probe_wall_s": wall, "epoch_s": per_epoch, "startup_s": startup, "epochs": epochs}
    log(f"probe {config.name} {' '.join(overrides)}: {per_epoch:.1f}s/epoch, start-up {startup:.0f}s "
        f"→ train.epochs={epochs} for {minutes:g} min")
    shutil.rmtree(run_dir, ignore_errors=True)
    return info


def schedule_depends_on_epochs(config: Path, overrides: list[str]) -> bool:
    from dist_lc.config import load_config

    return load_config(config, overrides).schedule.name == "cosine"


def run_unet(name: str, config: Path, overrides: list[str], tiles, shards: Path, folds, args, work: Path,
             reuse_train: dict | None = None) -> dict:
    """One U-Net recipe (config + overrides) on each fold, under the time budget; oof from last.pt."""
    train_over, pred_opts = split_overrides(overrides + list(args.set))
    tta = str(pred_opts.get("tta", "true" if args.tta else "false")).lower() in ("1", "true", "yes")
    which = pred_opts.get("checkpoint", "last")
    res = {"name": name, "kind": "unet", "config": str(config), "overrides": overrides, "per_fold": {}, "oof": {},
           "folds_info": {}, "tta": tta, "checkpoint": which}
    if reuse_train is not None:   # prediction-only variant: the base recipe's trained runs
        runs = reuse_train["runs"]
        res["epoch_plan"] = reuse_train.get("epoch_plan")
    else:
        key = tag_of(Path(config).read_text(), train_over, args.minutes, args.epochs, str(shards),
                     *([NPROC] if NPROC > 1 else []))
        base = work / "runs" / f"{Path(config).stem}-{key}"
        runs, plan = {}, None
        if args.epochs == "auto" and schedule_depends_on_epochs(config, train_over):
            plan_file = base / "epoch_plan.json"
            if args.reuse and plan_file.exists():
                plan = json.loads(plan_file.read_text())
            else:
                base.mkdir(parents=True, exist_ok=True)
                plan = probe_epochs(config, shards, folds[0], train_over, args.minutes, base)
                plan_file.write_text(json.dumps(plan))
            train_over = train_over + [f"train.epochs={plan['epochs']}"]
        elif args.epochs not in ("auto", "recipe"):
            train_over = train_over + [f"train.epochs={int(args.epochs)}"]
        res["epoch_plan"] = plan
        for k in folds:
            run_dir = base / f"fold{k}"
            done = run_dir / "train_done.json"
            if args.reuse and done.exists():
                info = json.loads(done.read_text())
                log(f"{name} fold {k}: reusing {run_dir}")
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
                run_dir.mkdir(parents=True)
                log(f"{name} fold {k}: training {args.minutes:g} min → {run_dir}")
                wall = run_cmd(train_cmd(config, shards, k, train_over + [f"train.time_limit={args.minutes}"],
                                         run_dir), run_dir / "stdout.log")
                rows = read_metrics(run_dir)
                info = {"train_wall_s": wall, "epochs": len(rows),
                        "planned_epochs": plan["epochs"] if plan else None,
                        "images_per_s": float(np.median([r["images_per_s"] for r in rows])) if rows else None,
                        "epoch_s": float(np.median([r["epoch_time_s"] for r in rows])) if rows else None,
                        "last_val_kl": rows[-1]["val_kl"] if rows else None,
                        "best_val_kl": min(r["val_kl"] for r in rows) if rows else None,
                        "curve": [(r["epoch"], r["val_kl"]) for r in rows]}
                done.write_text(json.dumps(info))
            runs[k] = {"dir": str(run_dir), **info}
        res["runs"] = runs
    for k in folds:
        run = runs[k]
        run_dir = Path(run["dir"])
        out = run_dir / f"oof-{which}{'-tta' if tta else ''}.csv"
        cmd = [sys.executable, "-m", "dist_lc", "predict", "--checkpoint", str(run_dir / "checkpoints" / f"{which}.pt"),
               "--shards", str(shards), "--split", f"fold:{k}", "--out", str(out), "--workers", "1"]
        pred_s = run_cmd(cmd + (["--tta"] if tta else []), run_dir / "predict.log")
        table_ = pd.read_csv(out, dtype={"sample_id": str}).set_index("sample_id")
        val = tiles.select([k])
        pred = table_.loc[[tiles.keys[i] for i in val], list(CLASS_NAMES)].to_numpy(np.float64)
        res["per_fold"][k] = score(tiles.props[val], pred)
        res["oof"].update(zip(val.tolist(), pred))
        res["folds_info"][k] = {**{kk: v for kk, v in run.items() if kk != "curve"}, "predict_s": pred_s}
        log(f"{name} fold {k}: KL {res['per_fold'][k]:.5f} ({run['epochs']} epochs, trainer's last val_kl "
            f"{fmt(run['last_val_kl'], 5)}, {fmt(run['images_per_s'], 1)} img/s)")
    return res


def calibrated(res: dict, tiles) -> dict:
    """The method's oof predictions calibrated by dist_lc.calibration, cross-fitted: each fold by a fit
    on the other folds' oof tiles (what ``dist-lc cv`` reports and applies to its submission)."""
    idx = np.array(sorted(res["oof"]))
    pred = np.stack([res["oof"][i] for i in idx])
    out = calibration.cross_fitted(tiles.props[idx], pred, tiles.folds[idx])
    per_fold = {k: score(tiles.props[idx][tiles.folds[idx] == k], out[tiles.folds[idx] == k]) for k in res["per_fold"]}
    return {**{k: v for k, v in res.items() if k not in ("per_fold", "oof", "name")},
            "name": f"{res['name']} + calibration", "per_fold": per_fold, "oof": dict(zip(idx.tolist(), out)),
            "calibrated_from": res["name"]}


def with_calibration(results: list[dict], tiles, folds) -> list[dict]:
    """Each method followed by its cross-fitted calibration (needs 2 folds; not for the baseline)."""
    if len(folds) < 2:
        return results
    out = []
    for r in results:
        out.append(r)
        if r["kind"] != "baseline" and not r.get("calibrated_from") and not r.get("same_model_as_above"):
            out.append(calibrated(r, tiles))
    return out


def from_json(path: Path, tiles, folds) -> list[dict]:
    """Results saved by an earlier run's ``--json`` (same shards and folds), e.g. the slow pixel GBM."""
    index = {k: i for i, k in enumerate(tiles.keys)}
    out = []
    for d in json.loads(path.read_text()):
        if d.get("calibrated_from"):
            continue
        per_fold = {int(k): v for k, v in d["per_fold"].items()}
        if sorted(per_fold) != sorted(folds):
            raise SystemExit(f"--include {path}: {d['name']} has folds {sorted(per_fold)}, this run {sorted(folds)}")
        res = {k: v for k, v in d.items() if k not in ("summary", "oof_tiles")}
        res.update(per_fold=per_fold, folds_info={int(k): v for k, v in d.get("folds_info", {}).items()},
                   oof={index[key]: np.asarray(p) for key, p in d["oof_tiles"].items()}, included_from=str(path))
        out.append(res)
    return out


def recomputed(res: dict, args) -> bool:
    """Whether this run computes the method of an included result again (baseline, GBM, a recipe)."""
    if res["kind"] == "unet":
        return "unet" in args.methods and res["name"] in {f"U-Net `{r.name}`" for r in args.recipes}
    return res["kind"] in args.methods


# ----------------------------------------------------------------------------- report


def summarise(res: dict, tiles) -> dict:
    idx = np.array(sorted(res["oof"]))
    pred = np.stack([res["oof"][i] for i in idx])
    keep = scored_mask(tiles.props[idx])
    scores = list(res["per_fold"].values())
    return {"oof": float(kl_per_sample(tiles.props[idx][keep], pred[keep]).mean()),
            "per_class": kl_per_class(tiles.props[idx][keep], pred[keep]),
            "mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan"),
            "tiles": int(keep.sum())}


def short_label(args) -> str:
    short = []
    if len(args.folds) < FULL["folds"]:
        short.append(f"{len(args.folds)} of 5 folds")
    if args.minutes < FULL["minutes"] and "unet" in args.methods:
        short.append(f"{args.minutes:g} min per fold")
    if args.gbm_pixels < FULL["gbm_pixels"] and "gbm" in args.methods:
        short.append(f"{args.gbm_pixels / 1e6:g} M-pixel GBM sample")
    return f"SHORT RUN ({', '.join(short)})" if short else "full run"


def unet_cols(res) -> tuple[str, str, str]:
    info = res.get("folds_info", {})
    if res["kind"] != "unet" or not info:
        return "–", "–", "–"
    walls = [v["train_wall_s"] / 60 for v in info.values()]
    ips = [v["images_per_s"] for v in info.values() if v.get("images_per_s")]
    ep = [f"{v['epochs']}" + (f"/{v['planned_epochs']}" if v.get("planned_epochs") else "") for v in info.values()]
    return f"{np.mean(walls):.1f}", (f"{np.median(ips):.1f}" if ips else "–"), ", ".join(ep)


def render(results: list[dict], tiles, args, started: str, title: str, ablation: bool) -> str:
    folds = list(args.folds)
    lines = [f"### {title} — {short_label(args)}", "",
             f"Command: `python benchmarks/quality.py {shlex.join(args.argv)}`  ",
             f"Machine: {machine_line()}  ",
             f"Started {started}; data: `{args.src}` packed with 5 folds (seed 0), "
             f"out-of-fold tiles scored: {summarise(results[0], tiles)['tiles']}."
             + (f" U-Net budget: train.time_limit = {args.minutes:g} min per fold (epochs: {args.epochs}), "
                f"{'1 process' if args.nproc == 1 else f'{args.nproc} DDP ranks (torchrun, gloo)'}, "
                f"oof tiles predicted from {'best' if 'predict.checkpoint=best' in args.set else 'last'}.pt"
                f"{' with TTA' if args.tta else ''}." if any(r["kind"] == "unet" for r in results) else "")
             + (f" Pixel GBM: {args.gbm_pixels} px sample, {args.gbm_rounds} rounds, {args.gbm_threads} thread(s), "
                f"prediction on a stride-{args.gbm_stride} pixel grid."
                if any(r["kind"] == "gbm" for r in results) else ""), ""]
    sums = [summarise(r, tiles) for r in results]
    if ablation:
        base = sums[0]["oof"]
        cal = len(folds) >= 2   # calibration is cross-fitted over folds
        headers = ["variant", "overrides", *[f"fold {k}" for k in folds], "mean ± std", "oof KL", "Δ oof vs base",
                   *(["oof KL calibrated"] if cal else []), "train min/fold", "img/s", "epochs"]
        rows = []
        for r, s in zip(results, sums):
            wall, ips, ep = unet_cols(r)
            rows.append([r["name"], " ".join(f"`{o}`" for o in r.get("overrides", [])) or "–",
                         *[fmt(r["per_fold"][k]) for k in folds], f"{fmt(s['mean'])} ± {fmt(s['std'])}",
                         f"**{fmt(s['oof'])}**", "–" if r is results[0] else f"{s['oof'] - base:+.4f}",
                         *([fmt(summarise(calibrated(r, tiles), tiles)["oof"])] if cal else []), wall, ips, ep])
        lines.append(table(headers, rows, "ll" + "r" * (len(headers) - 2)))
    else:
        headers = ["method", *[f"fold {k}" for k in folds], "mean ± std", "oof KL", "train min/fold", "img/s",
                   "epochs (done/planned)"]
        rows = []
        for r, s in zip(results, sums):
            wall, ips, ep = unet_cols(r)
            if r["kind"] == "gbm" and r.get("folds_info"):
                wall = f"{np.mean([v['sample_s'] + v['train_s'] for v in r['folds_info'].values()]) / 60:.1f}"
            rows.append([r["name"], *[fmt(r["per_fold"][k]) for k in folds], f"{fmt(s['mean'])} ± {fmt(s['std'])}",
                         f"**{fmt(s['oof'])}**", wall, ips, ep])
        lines.append(table(headers, rows))
    lines += ["", "Out-of-fold KL per scored class (the columns add up to the oof score):", "",
              table(["method", *SCORED_NAMES], [[r["name"], *[fmt(s["per_class"][c], 5) for c in SCORED_NAMES]]
                                                for r, s in zip(results, sums)])]
    detail = []
    for r in results:
        for k, v in r.get("folds_info", {}).items():
            if r["kind"] == "gbm" and not r.get("same_model_as_above"):
                detail.append([r["name"], k, f"{v['wall_s']:.0f}", f"sample {v['sample_s']:.0f} s + train "
                               f"{v['train_s']:.0f} s ({v['pixels']} px, {v['threads']} thread) + predict "
                               f"{v['predict_s']:.0f} s", "–"])
            elif r["kind"] == "unet":
                detail.append([r["name"], k, f"{v['train_wall_s'] + v['predict_s']:.0f}",
                               f"train {v['train_wall_s']:.0f} s ({v['epochs']} epochs, median "
                               f"{fmt(v['epoch_s'], 1)} s/epoch) + predict {v['predict_s']:.0f} s",
                               f"{fmt(v['last_val_kl'], 4)} / {fmt(v['best_val_kl'], 4)}"])
    if detail:
        lines += ["", "Wall time per fold (the trainer's own validation KL at the last / best epoch, for "
                  "reference; the table scores last.pt through `dist_lc predict`):", "",
                  table(["method", "fold", "wall s", "split", "trainer val_kl last / best"], detail, "lrrll")]
    plans = [(r["name"], r["epoch_plan"]) for r in results if r.get("epoch_plan")]
    if plans:
        lines += ["", "Epoch plans (probe of 2 epochs on the first fold, outside the budget): " + "; ".join(
            f"{n}: {p['epoch_s']:.1f} s/epoch, start-up {p['startup_s']:.0f} s → {p['epochs']} epochs"
            for n, p in plans) + "."]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str, text: str) -> None:
    """Replace (or append) the block between ``<!-- quality:<section> begin/end -->`` in ``path``."""
    begin, end = f"<!-- quality:{section} begin -->", f"<!-- quality:{section} end -->"
    block = f"{begin}\n{text}{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + block
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def to_json(results, tiles) -> list[dict]:
    out = []
    for r in results:
        d = {k: v for k, v in r.items() if k not in ("oof",)}
        d["summary"] = summarise(r, tiles)
        d["oof_tiles"] = {tiles.keys[i]: list(map(float, p)) for i, p in r["oof"].items()}
        out.append(d)
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=SAMPLE_SRC, help="challenge-layout folder (the real sample)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dist_lc_quality"), help="shards and run folders")
    ap.add_argument("--shards", type=Path, help="shard folder (default WORK/shards, packed if absent)")
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--minutes", type=float, default=10.0, help="train.time_limit per fold per U-Net recipe")
    ap.add_argument("--methods", nargs="+", default=["baseline", "gbm", "unet"], choices=["baseline", "gbm", "unet"])
    ap.add_argument("--recipes", type=Path, nargs="+",
                    default=[REPO / "configs" / "benchmark.yaml", REPO / "configs" / "recommended.yaml"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every U-Net run (dist_lc config key, or predict.tta / predict.checkpoint)")
    ap.add_argument("--epochs", default="auto", help="auto (probe for cosine schedules) | recipe | N")
    ap.add_argument("--nproc", type=int, default=1,
                    help="DDP ranks per U-Net run (torchrun --nproc_per_node; the effective batch is kept)")
    ap.add_argument("--tta", action="store_true", help="predict the U-Nets' oof tiles with the 8 flips/rotations")
    ap.add_argument("--gbm-pixels", type=int, default=FULL["gbm_pixels"])
    ap.add_argument("--gbm-rounds", type=int, default=pixel_gbm.DEFAULT_ROUNDS)
    ap.add_argument("--gbm-stride", type=int, default=pixel_gbm.DEFAULT_STRIDE)
    ap.add_argument("--gbm-threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ablate", type=Path, metavar="RECIPE", help="ablation mode: variants of this recipe")
    ap.add_argument("--variant", action="append", default=[], metavar="'NAME: KEY=V ...'",
                    help="an ablation variant (repeatable); default: DEFAULT_VARIANTS")
    ap.add_argument("--reuse", action="store_true", help="reuse finished fold runs (same recipe, overrides, budget)")
    ap.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    ap.add_argument("--section", help="markdown section name (default: main, or ablation)")
    ap.add_argument("--json", type=Path, help="write every number (and the oof predictions) here")
    ap.add_argument("--include", type=Path, action="append", default=[], metavar="JSON",
                    help="add the methods of an earlier run's --json (same shards and folds), e.g. "
                         "'--methods baseline gbm --json gbm.json' once, then '--methods unet --include gbm.json'")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    global NPROC
    NPROC = args.nproc
    if args.epochs not in ("auto", "recipe") and not args.epochs.isdigit():
        ap.error("--epochs: auto, recipe or a number")
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    args.work.mkdir(parents=True, exist_ok=True)
    shards = ensure_shards(args.shards or args.work / "shards", args.src)
    tiles = pixel_gbm.load_tiles(shards)
    bad = sorted(set(args.folds) - set(tiles.folds.tolist()))
    if bad:
        ap.error(f"--folds {bad}: {shards} has folds {sorted(set(tiles.folds.tolist()))}")
    results: list[dict] = []

    def flush(title, ablation):
        shown = results if ablation else with_calibration(results, tiles, args.folds)
        text = render(shown, tiles, args, started, title, ablation)
        write_section(args.md, args.section or ("ablation" if ablation else "main"), text)
        if args.json:
            args.json.write_text(json.dumps(to_json(shown, tiles), indent=1, default=str))
        return text

    if args.ablate:
        variants = [parse_variant(v) for v in args.variant] or DEFAULT_VARIANTS
        title = f"Ablation of `{args.ablate.name}`: one change at a time, same budget"
        base = run_unet(f"{args.ablate.stem} (base)", args.ablate, [], tiles, shards, args.folds, args, args.work)
        results.append(base)
        flush(title, True)
        for name, overrides in variants:
            train_over, _ = split_overrides(overrides)
            try:
                res = run_unet(name, args.ablate, overrides, tiles, shards, args.folds, args, args.work,
                               reuse_train=None if train_over else base)
            except RuntimeError as exc:
                log(f"variant {name!r} failed: {exc}")
                continue
            results.append(res)
            flush(title, True)
        print(flush(title, True))
        return 0

    title = "Prediction quality on the real sample (5-fold CV by tile)"
    results.append(run_baseline(tiles, args.folds))
    if "baseline" not in args.methods:
        results.clear()
    for path in args.include:   # what this run computes itself is not taken twice
        results += [r for r in from_json(path, tiles, args.folds) if not recomputed(r, args)]
    if "gbm" in args.methods:
        results += run_gbm(tiles, args.folds, args)
        flush(title, False)
    if "unet" in args.methods:
        for recipe in args.recipes:
            results.append(run_unet(f"U-Net `{recipe.name}`", recipe, [], tiles, shards, args.folds, args, args.work))
            flush(title, False)
    print(flush(title, False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
