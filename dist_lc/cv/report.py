"""``dist-lc report CVDIR``: the CV report from what the jobs left in the CV folder.

Reads cv.json (the plan) and each fold's run dir (done.json, metrics.csv, oof.csv, test.csv); needs
no job and no GPU. Writes, per grid point, ``oof.csv`` (every finished fold's held-out tiles, as
predicted by that fold's best.pt); then ``oof.csv`` and ``submission.csv`` of the best point (lowest
mean validation KL; the submission is the mean of the folds' test predictions, i.e. the ensemble of
their best checkpoints), ``report.json``, ``report.md`` and ``plots/*.png``.

Calibration (``cv.calibrate``, :mod:`dist_lc.calibration`): fitted on the best point's out-of-fold
tiles and applied to ``submission.csv`` when its cross-fitted out-of-fold score (``oof_calibrated.csv``,
each fold calibrated by a fit on the others) is lower than the uncalibrated one.

Scores: ``mean_kl ± std_kl`` over folds of each fold's best validation KL (from training;
std with ddof=1); ``oof_kl`` all out-of-fold tiles scored together (dist_lc.metrics.kl_score) with
its per-class contributions; ``baseline_kl`` the same tiles predicted by the mean class proportions
of their fold's training folds. Tiles whose truth holds no scored class (clouds/no_data only) have
no score and are left out, as in training's validation.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from lc_common.errors import InputError
from lc_common.tiles import CLASS_NAMES
from shard_tools import tarstream
from shard_tools.format import decode_sample
from shard_tools.manifest import load_manifest

from .. import calibration, pixel_metrics, second_stage, tile_features
from lc_common.atomic import write_csv_atomic, write_json_atomic
from ..plots import save_figure
from ..metrics import SCORED_CLASSES, SCORED_NAMES, kl_per_class, kl_per_sample
from ..run_log import read_metrics
from .plan import CONFUSION, DONE, OOF, TEST, Plan, Point, load_plan, now

CLASSES = list(CLASS_NAMES)
TRUTH, FEATURES = "truth.csv", "tile_features.csv"


# ----------------------------------------------------------------------------- inputs

def _props_of_shard(manifest, entry: dict) -> dict[str, np.ndarray]:
    """``{id: proportions}`` from a train shard's ``.props.npy`` members (a local shard is read by seeking
    over the images; a URL is streamed)."""
    out = {}
    stream = manifest.root.open(entry["name"])
    with stream, tarfile.open(fileobj=stream, mode="r|" if manifest.root.remote else "r") as tar:
        for member in tar:
            if member.name.endswith(".props.npy"):
                out[member.name.split(".", 1)[0]] = np.load(io.BytesIO(tar.extractfile(member).read()))
    return out


def read_truth(cv_dir: Path, shards) -> pd.DataFrame:
    """True proportions and fold of every train tile (from the shards; cached in truth.csv)."""
    cache = cv_dir / TRUTH
    manifest = load_manifest(shards)
    if cache.exists():
        truth = pd.read_csv(cache, dtype={"sample_id": str}).set_index("sample_id")
        if len(truth) == len(manifest.data["folds"]):
            return truth
    props = {}
    for entry in manifest.shards("train"):
        props.update(_props_of_shard(manifest, entry))
    ids = list(props)
    truth = pd.DataFrame(np.stack([props[i] for i in ids]), index=pd.Index(ids, name="sample_id"), columns=CLASSES)
    truth.insert(0, "fold", [int(manifest.data["folds"][i]) for i in ids])
    write_csv_atomic(cache, truth.reset_index())
    return truth


def read_pred(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id")[CLASSES]


def fold_row(plan: Plan, point: Point, fold: int, truth: pd.DataFrame) -> dict:
    """A finished fold's figures (done.json + its oof score), or ``{"fold", "status": "missing"}``."""
    run_dir = plan.run_dir(point, fold)
    if not (run_dir / DONE).exists():
        return {"fold": fold, "status": "missing", "run_dir": str(run_dir)}
    done = json.loads((run_dir / DONE).read_text())
    oof = read_pred(run_dir / OOF)
    score = _score(truth, oof)
    matrix = read_confusion(run_dir)
    return {"fold": fold, "status": "done", "best_epoch": done["best_epoch"], "best_val_kl": done["best_val_kl"],
            "pixel": pixel_metrics.summary(matrix) if matrix is not None else None,
            "final_train_loss": done["final_train_loss"], "epochs_done": done["epochs_done"],
            "epochs": done["epochs"], "oof_kl": score["kl"], "oof_tiles": score["tiles"],
            "train_s": round(done["train_s"], 1), "predict_s": round(done["predict_s"], 1),
            "world_size": done["world_size"], "job_id": done.get("job_id"), "run_dir": str(run_dir),
            "timeline": done.get("timeline")}


def read_confusion(run_dir: Path) -> np.ndarray | None:
    """The fold's out-of-fold pixel confusion matrix (folds written before it existed have none)."""
    path = run_dir / CONFUSION
    return np.asarray(json.loads(path.read_text())["matrix"], dtype=np.int64) if path.exists() else None


# ----------------------------------------------------------------------------- scores

def _score(truth: pd.DataFrame, pred: pd.DataFrame) -> dict:
    """KL of predicted tiles against the truth (tiles with no scored class left out)."""
    y = truth.loc[pred.index, CLASSES].to_numpy(np.float64)
    scored = y[:, list(SCORED_CLASSES)].sum(axis=1) > 0
    y_true, y_pred = y[scored], pred.to_numpy(np.float64)[scored]
    if not len(y_true):
        return {"kl": None, "per_class": {}, "tiles": 0, "unscored": int((~scored).sum())}
    return {"kl": float(kl_per_sample(y_true, y_pred).mean()), "per_class": kl_per_class(y_true, y_pred),
            "tiles": int(scored.sum()), "unscored": int((~scored).sum())}


def baseline(truth: pd.DataFrame, ids: pd.Index) -> pd.DataFrame:
    """Each tile predicted by the mean proportions of the tiles of the other folds (its training folds)."""
    rows = []
    for fold, group in truth.loc[ids].groupby("fold"):
        prior = truth.loc[truth["fold"] != fold, CLASSES].mean().to_numpy()
        rows.append(pd.DataFrame(np.tile(prior, (len(group), 1)), index=group.index, columns=CLASSES))
    return pd.concat(rows).loc[ids]


def point_block(plan: Plan, point: Point, truth: pd.DataFrame) -> dict:
    """Fold table, mean ± std, out-of-fold and baseline scores of one grid point; writes its oof.csv."""
    rows = [fold_row(plan, point, k, truth) for k in plan.folds]
    done = [r for r in rows if r["status"] == "done"]
    block = {"name": point.name, "params": point.params, "folds": done,
             "missing_folds": [r["fold"] for r in rows if r["status"] != "done"], "complete": len(done) == len(rows)}
    if not done:
        return {**block, "mean_kl": None, "std_kl": None, "oof_kl": None, "baseline_kl": None}
    scores = np.array([r["best_val_kl"] for r in done])
    oof = pd.concat([read_pred(Path(r["run_dir"]) / OOF) for r in done])
    write_csv_atomic(plan.point_dir(point) / OOF, oof.reset_index())
    score, base = _score(truth, oof), _score(truth, baseline(truth, oof.index))
    matrices = [m for m in (read_confusion(Path(r["run_dir"])) for r in done) if m is not None]
    confusion = sum(matrices) if len(matrices) == len(done) else None
    return {**block, "mean_kl": float(scores.mean()), "std_kl": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "oof_kl": score["kl"], "oof_tiles": score["tiles"], "oof_unscored_tiles": score["unscored"],
            "per_class": score["per_class"], "baseline_kl": base["kl"], "baseline_per_class": base["per_class"],
            "oof_pixel": pixel_metrics.summary(confusion) if confusion is not None else None,
            "oof_confusion": confusion.tolist() if confusion is not None else None}


def best_point(blocks: list[dict]) -> dict:
    """Lowest mean validation KL, complete points first."""
    scored = [b for b in blocks if b["mean_kl"] is not None]
    return min(scored, key=lambda b: (not b["complete"], b["mean_kl"]))


def calibrate_block(plan: Plan, point: Point, block: dict, truth: pd.DataFrame) -> dict:
    """Fit the calibration on the point's out-of-fold tiles; score it cross-fitted; applied if it helps.

    Writes ``oof_calibrated.csv`` (each fold calibrated by a fit on the other folds).
    """
    if not plan.config.cv.calibrate:
        return {"enabled": False, "applied": False, "reason": "cv.calibrate is false"}
    if len(block["folds"]) < 2:
        return {"enabled": True, "applied": False, "reason": "needs at least 2 finished folds"}
    oof = read_pred(plan.point_dir(point) / OOF)
    y, folds = truth.loc[oof.index, CLASSES].to_numpy(np.float64), truth.loc[oof.index, "fold"].to_numpy()
    crossed = pd.DataFrame(calibration.cross_fitted(y, oof.to_numpy(np.float64), folds), index=oof.index,
                           columns=CLASSES)
    write_csv_atomic(plan.cv_dir / "oof_calibrated.csv", crossed.reset_index())
    score = _score(truth, crossed)
    fitted = calibration.fit(y, oof.to_numpy(np.float64))
    return {"enabled": True, "applied": False, "oof_kl": score["kl"], "per_class": score["per_class"],
            "params": fitted.to_dict()}


def tile_features_table(plan: Plan, manifest) -> pd.DataFrame:
    """Every tile's cheap features (:mod:`dist_lc.tile_features`), from one pass over the shards'
    images; cached in the CV folder as tile_features.csv."""
    cache = plan.cv_dir / FEATURES
    if cache.exists():
        table = pd.read_csv(cache, dtype={"sample_id": str}).set_index("sample_id")
        if len(table) == sum(s["count"] for s in manifest.data["shards"]):
            return table

    def tiles():
        for entry in manifest.data["shards"]:
            with manifest.root.open(entry["name"]) as stream:
                for raw in tarstream.samples(stream, wanted={"image.npy"}, seekable=not manifest.root.remote):
                    key, image, _, _ = decode_sample(raw)
                    yield key, image, entry["split"] == "train"

    keys, values = tile_features.features(tiles())
    table = pd.DataFrame(values, index=pd.Index(keys, name="sample_id"), columns=tile_features.names())
    write_csv_atomic(cache, table.reset_index())
    return table


def second_stage_block(plan: Plan, point: Point, block: dict, truth: pd.DataFrame) -> dict:
    """Score the second stage cross-fitted on the point's out-of-fold tiles (``oof_second_stage.csv``)."""
    if not plan.config.cv.second_stage:
        return {"enabled": False, "applied": False, "reason": "cv.second_stage is false"}
    oof = read_pred(plan.point_dir(point) / OOF)
    if len(block["folds"]) < 2 or len(oof) < second_stage.MIN_TILES:
        return {"enabled": True, "applied": False, "reason": f"needs at least 2 finished folds and "
                f"{second_stage.MIN_TILES} out-of-fold tiles (has {len(block['folds'])} and {len(oof)})"}
    features = tile_features_table(plan, load_manifest(plan.config.data.shards)).loc[oof.index]
    y, folds = truth.loc[oof.index, CLASSES].to_numpy(np.float64), truth.loc[oof.index, "fold"].to_numpy()
    crossed = pd.DataFrame(second_stage.cross_fitted(y, oof.to_numpy(np.float64), features.to_numpy(), folds),
                           index=oof.index, columns=CLASSES)
    write_csv_atomic(plan.cv_dir / "oof_second_stage.csv", crossed.reset_index())
    score = _score(truth, crossed)
    return {"enabled": True, "applied": False, "oof_kl": score["kl"], "per_class": score["per_class"],
            "rounds": second_stage.ROUNDS, "features": features.shape[1] + 8}


def choose_correction(block: dict, calib: dict, stage: dict) -> str:
    """The submission's correction: the one with the lowest cross-fitted out-of-fold KL, or none."""
    options = {"none": block["oof_kl"], "calibration": calib.get("oof_kl"), "second_stage": stage.get("oof_kl")}
    scored = {k: v for k, v in options.items() if v is not None}
    chosen = min(scored, key=scored.get) if scored else "none"
    for name, part in (("calibration", calib), ("second_stage", stage)):
        if part.get("oof_kl") is not None:
            part["applied"] = chosen == name
            part["reason"] = ("lowest cross-fitted oof KL: applied to submission.csv" if chosen == name else
                              f"not applied: {chosen.replace('_', ' ')} scores lower cross-fitted")
    return chosen


def ensemble(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Row-wise mean of prediction tables (on the first one's ids), renormalised."""
    mean = sum(t.loc[tables[0].index] for t in tables) / len(tables)
    return mean.div(mean.sum(axis=1), axis=0)


def write_submission(plan: Plan, point: Point, block: dict, calib: dict, correction: str,
                     truth: pd.DataFrame) -> dict | None:
    """The mean of the finished folds' test predictions (= the ensemble of their best.pt), or, with a
    correction, the mean of the corrected fold predictions (a correction is fitted on single models'
    out-of-fold tiles, so it is applied to each fold's model, then averaged); the plain mean is then
    kept as submission_uncalibrated.csv."""
    paths = [Path(r["run_dir"]) / TEST for r in block["folds"]]
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    tables = [read_pred(p) for p in paths]
    final = mean = ensemble(tables)
    if correction != "none":
        write_csv_atomic(plan.cv_dir / "submission_uncalibrated.csv", mean.reset_index())
        correct = _corrector(plan, point, calib, correction, truth)
        final = ensemble([pd.DataFrame(correct(t), index=t.index, columns=CLASSES) for t in tables])
    write_csv_atomic(plan.cv_dir / "submission.csv", final.reset_index())
    return {"path": "submission.csv", "point": point.name, "folds": [r["fold"] for r in block["folds"]],
            "tiles": len(final), "tta": plan.config.cv.tta, "calibrated": correction == "calibration",
            "correction": correction}


def _corrector(plan: Plan, point: Point, calib: dict, correction: str, truth: pd.DataFrame):
    """table → corrected (n, 10) array, fitted on every out-of-fold tile of the point."""
    if correction == "calibration":
        cal = calibration.Calibration(**calib["params"])
        return lambda t: cal.apply(t.to_numpy(np.float64))
    oof = read_pred(plan.point_dir(point) / OOF)
    features = tile_features_table(plan, load_manifest(plan.config.data.shards))
    stage = second_stage.fit(truth.loc[oof.index, CLASSES].to_numpy(np.float64), oof.to_numpy(np.float64),
                             features.loc[oof.index].to_numpy())
    return lambda t: stage.apply(t.to_numpy(np.float64), features.loc[t.index].to_numpy())


# ----------------------------------------------------------------------------- plots

def _series(rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a metrics.csv column, skipping epochs without it (train.val_every)."""
    kept = [r for r in rows if r.get(column)]
    return [int(r["epoch"]) for r in kept], [float(r[column]) for r in kept]


def plot_learning_curves(plan: Plan, point: Point, path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_kl = fig.subplots(1, 2)
    for k in plan.folds:
        rows = read_metrics(plan.run_dir(point, k))
        if not rows:
            continue
        line, = ax_loss.plot(*_series(rows, "train_loss"), marker=".", label=f"fold {k} train")
        ax_loss.plot(*_series(rows, "val_loss"), ls="--", color=line.get_color(), label=f"fold {k} val")
        ax_kl.plot(*_series(rows, "val_kl"), marker=".", color=line.get_color(), label=f"fold {k}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    ax_kl.set(xlabel="epoch", ylabel="validation KL", title="validation KL per epoch")
    for ax in (ax_loss, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"learning curves {point.name}".strip())
    _save(fig, path)


def plot_fold_scores(block: dict, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    folds = [r["fold"] for r in block["folds"]]
    ax.bar([str(k) for k in folds], [r["best_val_kl"] for r in block["folds"]], color="tab:blue", label="best val KL")
    ax.axhline(block["mean_kl"], color="k", label=f"mean {block['mean_kl']:.4f}")
    if block["baseline_kl"] is not None:
        ax.axhline(block["baseline_kl"], color="tab:red", ls="--", label=f"baseline {block['baseline_kl']:.4f}")
    ax.set(xlabel="fold", ylabel="KL (lower is better)", title="per-fold best validation score")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_per_class(block: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    x = np.arange(len(SCORED_NAMES))
    ax.bar(x - 0.2, [block["per_class"].get(c, 0) for c in SCORED_NAMES], 0.4, label=f"oof {block['oof_kl']:.4f}")
    ax.bar(x + 0.2, [block["baseline_per_class"].get(c, 0) for c in SCORED_NAMES], 0.4,
           label=f"baseline {block['baseline_kl']:.4f}", color="tab:gray")
    ax.set_xticks(x, SCORED_NAMES, rotation=30)
    ax.set(ylabel="contribution to KL", title="per-class contributions, out-of-fold")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_confusion(block: dict, path: Path) -> None:
    """Out-of-fold pixel confusion matrix, each true class's row as shares of its pixels."""
    m = np.asarray(block["oof_confusion"], dtype=np.float64)
    shares = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(m)):
        for j in range(len(m)):
            ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(SCORED_NAMES)), SCORED_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(len(SCORED_NAMES)), SCORED_NAMES)
    miou = block["oof_pixel"]["miou"]
    ax.set(xlabel="predicted", ylabel="true", title=f"out-of-fold pixels (mIoU {_f(miou)})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_grid(blocks: list[dict], path: Path) -> None:
    shown = [b for b in blocks if b["mean_kl"] is not None]
    fig = Figure(figsize=(max(6, len(shown)), 4))
    ax = fig.subplots()
    ax.errorbar(range(len(shown)), [b["mean_kl"] for b in shown], yerr=[b["std_kl"] for b in shown], fmt="o", capsize=4)
    ax.set_xticks(range(len(shown)), [b["name"] for b in shown], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="mean validation KL ± std", title="grid points")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def make_plots(plan: Plan, blocks: list[dict], best: dict) -> list[str]:
    plots = plan.cv_dir / "plots"
    names = []
    for point, block in zip(plan.points, blocks):
        name = f"learning_curves{'_' + point.name if point.name else ''}.png"
        plot_learning_curves(plan, point, plots / name)
        names.append(name)
    plot_fold_scores(best, plots / "fold_scores.png")
    plot_per_class(best, plots / "per_class.png")
    names += ["fold_scores.png", "per_class.png"]
    if best.get("oof_confusion") is not None:
        plot_confusion(best, plots / "confusion.png")
        names.append("confusion.png")
    if plan.grid:
        plot_grid(blocks, plots / "grid_scores.png")
        names.append("grid_scores.png")
    return [f"plots/{n}" for n in names]


# ----------------------------------------------------------------------------- markdown

def _f(value, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    best = f" · best grid point **{report['name']}**" if report.get("grid") else ""
    lines = [f"# Cross-validation report: {report['cv_dir']}", "",
             f"{report['created']} · executor {report['executor']} · folds {report['folds_planned']} · "
             f"TTA {'on' if report['tta'] else 'off'}{best}",
             "", "| fold | best epoch | best val KL | oof KL | final train loss | epochs | train s | predict s | "
             "job s | outside epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["folds"]:
        t = r.get("timeline") or {}
        outside = f"{1 - t['epochs_s'] / t['job_s']:.0%}" if t.get("job_s") else "–"
        lines.append(f"| {r['fold']} | {r['best_epoch']} | {_f(r['best_val_kl'])} | {_f(r['oof_kl'])} | "
                     f"{_f(r['final_train_loss'])} | {r['epochs_done']}/{r['epochs']} | {r['train_s']} | "
                     f"{r['predict_s']} | {t.get('job_s', 0):.0f} | {outside} |")
    lines += ["", f"- mean ± std of the best validation KL over {len(report['folds'])} fold(s): "
              f"**{_f(report['mean_kl'])} ± {_f(report['std_kl'])}**",
              f"- out-of-fold KL ({report.get('oof_tiles', 0)} tiles scored together): **{_f(report['oof_kl'])}**",
              f"- baseline KL (mean class proportions of the training folds): {_f(report['baseline_kl'])}"]
    cal = report["calibration"]
    if cal.get("oof_kl") is not None:
        lines.append(f"- out-of-fold KL **with calibration** (cross-fitted: each fold calibrated by a fit on the "
                     f"others): **{_f(cal['oof_kl'])}**; {cal['reason']} (scale {cal['params']['scale']:.3f}, "
                     f"biases {', '.join(f'{b:+.2f}' for b in cal['params']['bias'])})")
    elif cal["enabled"]:
        lines.append(f"- calibration not fitted: {cal['reason']}")
    stage = report.get("second_stage", {})
    if stage.get("oof_kl") is not None:
        lines.append(f"- out-of-fold KL **with the second stage** (boosted trees on the log-proportions and "
                     f"{stage['features'] - 8} tile features, cross-fitted): **{_f(stage['oof_kl'])}**; "
                     f"{stage['reason']}")
    elif stage.get("enabled"):
        lines.append(f"- second stage not fitted: {stage['reason']}")
    if report["missing_folds"]:
        lines.append(f"- **unfinished folds: {report['missing_folds']}** (scores above are over the finished ones)")
    if report.get("oof_pixel"):
        px = report["oof_pixel"]
        lines += ["", "## Pixel metrics (best checkpoint of each fold on its held-out tiles)", "",
                  "| fold | pixel accuracy | mIoU | " + " | ".join(SCORED_NAMES) + " |",
                  "|---|---|---|" + "---|" * len(SCORED_NAMES)]
        for r in [*report["folds"], {"fold": "out-of-fold", "pixel": px}]:
            p = r.get("pixel") or {}
            lines.append(f"| {r['fold']} | {_f(p.get('pixel_acc'))} | {_f(p.get('miou'))} | "
                         + " | ".join(_f(p.get(f"iou_{c}")) for c in SCORED_NAMES) + " |")
        lines.append("")
        lines.append("IoU per class; mIoU over the classes present in the truth or the prediction; the KL score "
                     "(above) is the one that selects models.")
    calibrated, staged = cal.get("per_class", {}), stage.get("per_class", {})
    lines += ["", "## Per-class contributions (out-of-fold)", "",
              "| class | oof | oof calibrated | oof second stage | baseline |", "|---|---|---|---|---|"]
    for c in SCORED_NAMES:
        lines.append(f"| {c} | {_f(report['per_class'].get(c))} | {_f(calibrated.get(c))} | {_f(staged.get(c))} | "
                     f"{_f(report['baseline_per_class'].get(c))} |")
    if report.get("grid"):
        lines += ["", "## Grid points, ranked by mean validation KL", "",
                  "| rank | point | params | mean KL | std | oof KL | folds done |", "|---|---|---|---|---|---|---|"]
        by_name = {b["name"]: b for b in report["grid"]}
        for i, b in enumerate((by_name[n] for n in report["grid_ranking"]), 1):
            lines.append(f"| {i} | {b['name']} | {json.dumps(b['params'])} | {_f(b['mean_kl'])} | {_f(b['std_kl'])} | "
                         f"{_f(b['oof_kl'])} | {len(b['folds'])}/{len(b['folds']) + len(b['missing_folds'])} |")
    sub = report["submission"]
    lines += ["", "## Submission", "",
              f"`submission.csv`: {sub['tiles']} test tiles, ensemble of the best checkpoints of folds {sub['folds']}"
              + (", calibrated (uncalibrated: `submission_uncalibrated.csv`)" if sub["calibrated"] else "")
              if sub else "no test tiles in the shards: no submission"]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- entry points

def build(cv_dir) -> dict:
    """Write oof.csv files, submission.csv, report.json, report.md and plots; return the report."""
    plan = load_plan(cv_dir)
    truth = read_truth(plan.cv_dir, plan.config.data.shards)
    blocks = [point_block(plan, p, truth) for p in plan.points]
    if all(b["mean_kl"] is None for b in blocks):
        raise InputError(f"{plan.cv_dir}: no fold has finished yet (no done.json); nothing to report")
    best = best_point(blocks)
    point = plan.point(best["name"])
    if point.name:
        shutil.copyfile(plan.point_dir(point) / OOF, plan.cv_dir / OOF)
    report = {"cv_dir": str(plan.cv_dir), "created": now(),
              "executor": plan.executor, "tta": plan.config.cv.tta, "folds_planned": plan.folds,
              "complete": all(b["complete"] for b in blocks), **best}
    report["calibration"] = calibrate_block(plan, point, best, truth)
    report["second_stage"] = second_stage_block(plan, point, best, truth)
    correction = choose_correction(best, report["calibration"], report["second_stage"])
    report["submission"] = write_submission(plan, point, best, report["calibration"], correction, truth)
    report["plots"] = make_plots(plan, blocks, best)
    if plan.grid:
        report["grid_axes"] = plan.grid
        report["grid"] = blocks
        ranked = sorted(blocks, key=lambda b: (b["mean_kl"] is None, b["mean_kl"] or 0))
        report["grid_ranking"] = [b["name"] for b in ranked]
    write_json_atomic(plan.cv_dir / "report.json", report)
    (plan.cv_dir / "report.md").write_text(markdown(report))
    return report


def summary_line(report: dict) -> str:
    head = f"grid point {report['name']}: " if report.get("grid") else ""
    cal, stage = report.get("calibration", {}), report.get("second_stage", {})
    extra = [f"{_f(cal['oof_kl'])} calibrated"] if cal.get("oof_kl") is not None else []
    extra += [f"{_f(stage['oof_kl'])} second stage"] if stage.get("oof_kl") is not None else []
    return (f"{head}mean KL {_f(report['mean_kl'])} ± {_f(report['std_kl'])} over {len(report['folds'])} fold(s), "
            f"oof KL {_f(report['oof_kl'])}" + (f" ({', '.join(extra)})" if extra else "")
            + f", baseline {_f(report['baseline_kl'])}; {report['cv_dir']}/report.md")


def run(args) -> int:
    """``dist-lc report CVDIR``: exit 0 when every fold is finished, 1 for a partial report."""
    report = build(Path(args.cv_dir))
    print(summary_line(report))
    if not report["complete"]:
        print("report: some folds are not finished; the scores cover the finished ones", file=sys.stderr)
        return 1
    return 0
