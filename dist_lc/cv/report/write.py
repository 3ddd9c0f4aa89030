"""Stage 3 of the report: every file it leaves in the CV folder, and the report record itself.

Per grid point ``oof.csv`` (every finished fold's held-out tiles, as predicted by that fold's
best.pt); then, of the best point, ``oof.csv``, the corrections' cross-fitted ``oof_*.csv`` and
``submission.csv`` (the mean of the folds' test predictions, i.e. the ensemble of their best
checkpoints, corrected when stage 2 chose a correction); ``plots/*.png``; ``report.json`` and
``report.md`` last.
"""
from __future__ import annotations

import pandas as pd

from lc_common.atomic import write_bytes_atomic, write_csv_atomic, write_json_atomic

from ..plan import OOF, Plan, now
from . import figures
from .correct import Corrections
from .scores import grid_ranking
from .tables import CVTables, PointTables
from .text import markdown

CROSSED = {"calibration": "oof_calibrated.csv", "second_stage": "oof_second_stage.csv"}


def write_report(folder: CVTables, blocks: list[dict], best: dict, corrections: Corrections) -> dict:
    """Every file of the report; returns what report.json holds."""
    plan = folder.plan
    best_tables = folder.point(best["name"])
    write_oof_tables(plan, folder.points, best_tables)
    for name, table in corrections.crossed.items():
        write_csv_atomic(plan.cv_dir / CROSSED[name], table.reset_index())
    report = {"cv_dir": str(plan.cv_dir), "created": now(), "executor": plan.executor, "tta": plan.config.cv.tta,
              "folds_planned": plan.folds, "complete": all(b["complete"] for b in blocks), **best,
              "calibration": corrections.calibration, "second_stage": corrections.second_stage,
              "submission": write_submission(plan, best_tables, corrections),
              "plots": figures.draw(plan.cv_dir / "plots", folder.points, blocks, best, bool(plan.grid))}
    if plan.grid:
        report.update(grid_axes=plan.grid, grid=blocks, grid_ranking=grid_ranking(blocks))
    write_json_atomic(plan.cv_dir / "report.json", report)
    write_bytes_atomic(plan.cv_dir / "report.md", markdown(report).encode())
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
    kept as submission_uncalibrated.csv."""
    tests = [f.test for f in best.folds if f.test is not None]
    if not tests:
        return None
    final = mean = ensemble(tests)
    if corrections.correct is not None:
        write_csv_atomic(plan.cv_dir / "submission_uncalibrated.csv", mean.reset_index())
        final = ensemble([corrections.correct(t) for t in tests])
    write_csv_atomic(plan.cv_dir / "submission.csv", final.reset_index())
    return {"path": "submission.csv", "point": best.point.name, "folds": [f.fold for f in best.folds],
            "tiles": len(final), "tta": plan.config.cv.tta, "calibrated": corrections.chosen == "calibration",
            "correction": corrections.chosen}


def ensemble(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Row-wise mean of prediction tables (on the first one's ids), renormalised."""
    mean = sum(t.loc[tables[0].index] for t in tables) / len(tables)
    return mean.div(mean.sum(axis=1), axis=0)
