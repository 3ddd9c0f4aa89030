"""The report as text: report.md, the one line that ``dist-lc report`` and ``dist-lc cv`` print,
and the few lines of a terminal summary that ``dist-lc demo`` prints. Each renders the report
record (report.json) and nothing else.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from shard_tools.describe import drawn_tile_by_tile, fold_scheme

from ...metrics import SCORED_NAMES

TILE_FOLDS_HINT = "lc-shard pack --block-size above 1 holds out regions"
CORRECTIONS = (("calibration", "calibrated"), ("second_stage", "second stage"))   # report key, label


def fmt(value, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def spread(report: dict) -> str:
    """``mean ± std`` of the folds' best validation KL; no ± under 2 folds (a std of one value is no
    measure of noise)."""
    return fmt(report["mean_kl"]) + (f" ± {fmt(report['std_kl'])}" if report.get("std_kl") is not None else "")


def scored_corrections(report: dict) -> list[tuple[str, dict]]:
    """(label, record) of each correction that was fitted and scored."""
    return [(label, report[key]) for key, label in CORRECTIONS if report.get(key, {}).get("oof_kl") is not None]


def summary_line(report: dict) -> str:
    head = f"grid point {report['name']}: " if report.get("grid") else ""
    extra = [f"{fmt(part['oof_kl'])} {label}" for label, part in scored_corrections(report)]
    nested = report.get("choice_nested")
    if nested:
        extra.append(f"{fmt(nested['oof_kl'])} chosen, nested")
    tiles = (f"; folds drawn tile by tile: optimistic ({TILE_FOLDS_HINT})"
             if drawn_tile_by_tile(report.get("fold_blocks")) else "")
    return (f"{head}mean KL {spread(report)} over {len(report['folds'])} fold(s), "
            f"oof KL {fmt(report['oof_kl'])}" + (f" ({', '.join(extra)})" if extra else "")
            + f", baseline {fmt(report['baseline_kl'])}{tiles}; {report['cv_dir']}/report.md")


def summary(report: dict) -> str:
    """The folds, the scores against the baseline, the corrections, and where the files are."""
    cv_dir = Path(report["cv_dir"])
    runs = cv_dir / report["name"] if report["name"] else cv_dir
    lines = [f"best grid point         {report['name']}", ""] if report.get("grid") else []
    lines += ["| fold | best epoch | best val KL |", "|---|---|---|"]
    lines += [f"| {f['fold']} | {f['best_epoch']} | {fmt(f['best_val_kl'])} |" for f in report["folds"]]
    lines += ["", f"mean KL over folds      {spread(report)}",
              f"out-of-fold KL          {fmt(report['oof_kl'])}"]
    for label, part in scored_corrections(report):
        use = "applied to submission.csv" if part["applied"] else "not applied"
        lines.append(f"  {label:<20}  {fmt(part['oof_kl'])}   (cross-fitted over folds; {use})")
    if report.get("choice_nested"):
        lines.append(f"  {'chosen, nested':<20}  {fmt(report['choice_nested']['oof_kl'])}   "
                     "(each fold corrected as chosen on the other folds alone)")
    ratio = report["oof_kl"] / report["baseline_kl"] if report["oof_kl"] is not None and report["baseline_kl"] else None
    lines += [f"mean-distribution KL    {fmt(report['baseline_kl'])}   (predicting the training folds' mean)",
              f"oof / baseline          {fmt(ratio, 2)}"]
    if report["missing_folds"]:
        lines.append(f"unfinished folds        {report['missing_folds']} (the scores cover the finished ones)")
    lines += ["", f"report      {cv_dir / 'report.md'}", f"plots       {cv_dir / 'plots'}/*.png",
              f"oof         {cv_dir / 'oof.csv'}", f"submission  {cv_dir / 'submission.csv'}",
              f"fold runs   {runs}/fold<k>/ (metrics.csv, tensorboard/, plots/, checkpoints/)"]
    return "\n".join(lines)


# how a fold's training ended, beside its epochs, where it was not its schedule's end (done.json
# before this was recorded has no stop_reason)
ENDED = {"time_limit": " (time limit)", "early_stop": " (early stop)"}


def markdown(report: dict) -> str:
    best = f" · best grid point **{report['name']}**" if report.get("grid") else ""
    lines = [f"# Cross-validation report: {report['cv_dir']}", "",
             f"{report['created']} · executor {report['executor']} · folds {report['folds_planned']} "
             f"({fold_scheme(report.get('fold_blocks'))}) · "
             f"TTA {'on' if report['tta'] else 'off'}{best}",
             "", "| fold | best epoch | best val KL | oof KL | final train loss | epochs | train s | predict s | "
             "job s | outside epochs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["folds"]:
        t = r.get("timeline") or {}
        outside = f"{1 - t['epochs_s'] / t['job_s']:.0%}" if t.get("job_s") and "epochs_s" in t else "–"
        epochs = f"{r['epochs_done']}/{r['epochs']}{ENDED.get(r.get('stop_reason'), '')}"
        lines.append(f"| {r['fold']} | {r['best_epoch']} | {fmt(r['best_val_kl'])} | {fmt(r['oof_kl'])} | "
                     f"{fmt(r['final_train_loss'])} | {epochs} | {r['train_s']} | "
                     f"{r['predict_s']} | {t.get('job_s', 0):.0f} | {outside} |")
    lines += ["", f"- mean ± std of the best validation KL over {len(report['folds'])} fold(s): "
              f"**{spread(report)}**" + (" (no std from one fold)" if len(report["folds"]) < 2 else ""),
              f"- out-of-fold KL ({report.get('oof_tiles', 0)} tiles scored together): **{fmt(report['oof_kl'])}**",
              f"- baseline KL (mean class proportions of the training folds): {fmt(report['baseline_kl'])}"]
    lines += _correction_lines(report["calibration"], report.get("second_stage", {}))
    lines += _nested_lines(report.get("choice_nested"))
    if report["missing_folds"]:
        lines.append(f"- **unfinished folds: {report['missing_folds']}** (scores above are over the finished ones)")
    if report.get("oof_pixel"):
        lines += _pixel_table(report)
    lines += _per_class_table(report)
    if report.get("grid"):
        lines += _grid_table(report)
    lines += _submission_lines(report["submission"], [f["fold"] for f in report["folds"]])
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"


def _correction_lines(cal: dict, stage: dict) -> list[str]:
    lines = []
    if cal.get("oof_kl") is not None:
        lines.append(f"- out-of-fold KL **with calibration** (cross-fitted: each fold calibrated by a fit on the "
                     f"others): **{fmt(cal['oof_kl'])}**; {cal['reason']} (scale {cal['params']['scale']:.3f}, "
                     f"biases {', '.join(f'{b:+.2f}' for b in cal['params']['bias'])})")
    elif cal["enabled"]:
        lines.append(f"- calibration not fitted: {cal['reason']}")
    if stage.get("oof_kl") is not None:
        lines.append(f"- out-of-fold KL **with the second stage** (boosted trees on the log-proportions and "
                     f"{stage['features'] - 8} tile features, cross-fitted): **{fmt(stage['oof_kl'])}**; "
                     f"{stage['reason']}")
    elif stage.get("enabled"):
        lines.append(f"- second stage not fitted: {stage['reason']}")
    return lines


def _nested_lines(nested: dict | None) -> list[str]:
    if not nested:
        return []
    by_fold = ", ".join(f"fold {k}: {name.replace('_', ' ')}" for k, name in nested["choices"].items())
    return [f"- out-of-fold KL **of the chosen correction, nested** (for each fold, the corrections "
            f"cross-fitted over the other folds alone, the lowest chosen there and fitted on them): "
            f"**{fmt(nested['oof_kl'])}** ({by_fold})",
            "- the cross-fitted scores above are the ones the choice for submission.csv was made on (the lowest "
            "wins, the uncorrected predictions' included), so the winner's is biased low; the nested score is "
            "that of the whole procedure, choice included, on tiles it never saw"]


def _pixel_table(report: dict) -> list[str]:
    lines = ["", "## Pixel metrics (best checkpoint of each fold on its held-out tiles)", "",
             "| fold | pixel accuracy | mIoU | " + " | ".join(SCORED_NAMES) + " |",
             "|---|---|---|" + "---|" * len(SCORED_NAMES)]
    for r in [*report["folds"], {"fold": "out-of-fold", "pixel": report["oof_pixel"]}]:
        p = r.get("pixel") or {}
        lines.append(f"| {r['fold']} | {fmt(p.get('pixel_acc'))} | {fmt(p.get('miou'))} | "
                     + " | ".join(fmt(p.get(f"iou_{c}")) for c in SCORED_NAMES) + " |")
    return lines + ["", "IoU per class; mIoU over the classes present in the truth or the prediction; the KL score "
                    "(above) is the one that selects models."]


def _per_class_table(report: dict) -> list[str]:
    calibrated = report["calibration"].get("per_class", {})
    staged = report.get("second_stage", {}).get("per_class", {})
    lines = ["", "## Per-class contributions (out-of-fold)", "",
             "| class | oof | oof calibrated | oof second stage | baseline |", "|---|---|---|---|---|"]
    return lines + [f"| {c} | {fmt(report['per_class'].get(c))} | {fmt(calibrated.get(c))} | {fmt(staged.get(c))} | "
                    f"{fmt(report['baseline_per_class'].get(c))} |" for c in SCORED_NAMES]


def _grid_table(report: dict) -> list[str]:
    lines = ["", "## Grid points, ranked by mean validation KL", "",
             "| rank | point | params | mean KL | std | oof KL | folds done |", "|---|---|---|---|---|---|---|"]
    by_name = {b["name"]: b for b in report["grid"]}
    for i, b in enumerate((by_name[n] for n in report["grid_ranking"]), 1):
        lines.append(f"| {i} | {b['name']} | {json.dumps(b['params'])} | {fmt(b['mean_kl'])} | {fmt(b['std_kl'])} | "
                     f"{fmt(b['oof_kl'])} | {len(b['folds'])}/{len(b['folds']) + len(b['missing_folds'])} |")
    shared = report.get("grid_ranking_shared_folds")
    if shared is not None:
        lines += ["", "Points with unfinished folds come after the complete ones, ranked "
                  + (f"by their mean KL over the folds they all finished ({', '.join(map(str, shared))})"
                     if shared else "by their own means: they have no finished fold in common")
                  + "; points without a finite mean KL come last."]
    return lines


CORRECTED = {"calibration": "each fold model's predictions calibrated, then averaged",
             "second_stage": "each fold model's predictions corrected by the second stage, then averaged"}


def _submission_lines(sub: dict | None, finished: list[int]) -> list[str]:
    if not sub:
        return ["", "## Submission", "", "no test tiles in the shards: no submission"]
    correction = sub.get("correction", "calibration" if sub.get("calibrated") else "none")
    text = f"`submission.csv`: {sub['tiles']} test tiles, ensemble of the best checkpoints of folds {sub['folds']}"
    if correction in CORRECTED:
        text += f", {CORRECTED[correction]} (the plain ensemble: `submission_uncalibrated.csv`)"
    left_out = [k for k in finished if k not in sub["folds"]]
    if left_out:
        text += f"; finished folds {left_out} have no test.csv and are not in it"
    return ["", "## Submission", "", text]
