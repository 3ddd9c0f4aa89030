"""Stage 3 of the report: every file it leaves in the CV folder, and the report record itself.

``plots/*.png``; per grid point ``oof.csv`` (every finished fold's held-out tiles, as predicted by
that fold's best.pt); then, of the best point, ``oof.csv``, the corrections' cross-fitted ``oof_*.csv``
and ``submission.csv`` (the mean of the folds' test predictions, i.e. the ensemble
of their best checkpoints, corrected when stage 2 chose a correction); ``report.json`` and
``report.md`` last. A score that is not finite is written as null: report.json stays strict JSON.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from lc_common.atomic import fsync_dir, write_bytes_atomic, write_csv_atomic, write_json_atomic
from lc_common.errors import WriteError

from ..plan import OOF, Plan, now
from . import figures
from .correct import Corrections
from .scores import rank
from .tables import CVTables, PointTables
from .text import markdown

CROSSED = {"calibration": "oof_calibrated.csv", "second_stage": "oof_second_stage.csv"}
UNCORRECTED = "submission_uncalibrated.csv"   # the name from when calibration was the only correction


def write_report(folder: CVTables, blocks: list[dict], best: dict, corrections: Corrections) -> dict:
    """Every file of the report; returns what report.json holds."""
    plan = folder.plan
    best_tables = folder.point(best["name"])
    # the plots first: a plot that fails (matplotlib, a full disk) leaves no new table or submission
    # beside the report.json of an earlier report
    plots = figures.draw(plan.cv_dir / "plots", folder.points, blocks, best, bool(plan.grid))
    write_oof_tables(plan, folder.points, best_tables)
    for name, file in CROSSED.items():   # an earlier report's would pass for this best point's
        if name in corrections.crossed:
            write_csv_atomic(plan.cv_dir / file, corrections.crossed[name].reset_index())
        else:
            remove(plan.cv_dir / file)
    report = {"cv_dir": str(plan.cv_dir), "created": now(), "executor": plan.executor, "tta": plan.config.cv.tta,
              "folds_planned": plan.folds, "fold_blocks": folder.block_size,
              "complete": all(b["complete"] for b in blocks), **best,
              "calibration": corrections.calibration, "second_stage": corrections.second_stage,
              "choice_nested": corrections.nested,
              "submission": write_submission(plan, best_tables, corrections), "plots": plots}
    if plan.grid:
        ranking = rank(blocks)
        report.update(grid_axes=plan.grid, grid=blocks, grid_ranking=[b["name"] for b in ranking.blocks],
                      grid_ranking_shared_folds=ranking.shared_folds)
    report = strict(report)
    text = markdown(report)   # before either file: a report.json beside no (or an old) report.md looks done
    write_json_atomic(plan.cv_dir / "report.json", report)
    write_bytes_atomic(plan.cv_dir / "report.md", text.encode())
    return report


def write_oof_tables(plan: Plan, points: list[PointTables], best: PointTables) -> None:
    """Each point's out-of-fold table in its folder; the best point's also in the CV folder."""
    for tables in points:
        if tables.oof is not None:
            write_csv_atomic(plan.point_dir(tables.point) / OOF, tables.oof.reset_index())
    if best.point.name:   # else its folder is the CV folder
        write_csv_atomic(plan.cv_dir / OOF, best.oof.reset_index())


def write_submission(plan: Plan, best: PointTables, corrections: Corrections) -> dict | None:
    """The mean of the finished folds' test predictions (= the ensemble of their best.pt), or, with a
    correction, the mean of the corrected fold predictions (a correction is fitted on single models'
    out-of-fold tiles, so it is applied to each fold's model, then averaged); the plain mean is then
    kept as submission_uncalibrated.csv, and without a correction an earlier report's copy is
    removed (it would pass for the plain mean of these folds). "folds" are the folds averaged:
    those with a test.csv (stage 1 checked that they predict the same tiles)."""
    averaged = [f for f in best.folds if f.test is not None]
    if not averaged:
        return None
    tests = [f.test for f in averaged]
    final = mean = ensemble(tests)
    if corrections.correct is not None:
        write_csv_atomic(plan.cv_dir / UNCORRECTED, mean.reset_index())
        final = ensemble([corrections.correct(t) for t in tests])
    write_csv_atomic(plan.cv_dir / "submission.csv", final.reset_index())
    if corrections.correct is None:
        remove(plan.cv_dir / UNCORRECTED)
    return {"path": "submission.csv", "point": best.point.name, "folds": [f.fold for f in averaged],
            "tiles": len(final), "tta": plan.config.cv.tta, "calibrated": corrections.chosen == "calibration",
            "correction": corrections.chosen}


def remove(path: Path) -> None:
    """``path`` gone, durably (its folder fsynced), if it was there; a failure is a WriteError."""
    try:
        if path.exists():
            path.unlink()
            fsync_dir(path.parent)
    except OSError as exc:
        raise WriteError(path, exc) from exc


def strict(value):
    """``value`` with every non-finite float replaced by None (JSON's null; json.dumps would write NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def ensemble(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Row-wise mean of prediction tables (on the first one's ids), renormalised."""
    mean = sum(t.loc[tables[0].index] for t in tables) / len(tables)
    return mean.div(mean.sum(axis=1), axis=0)
