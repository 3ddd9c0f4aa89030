"""``dist-lc report CVDIR``: the CV report from what the jobs left in the CV folder; needs no job
and no GPU.

A pipeline of stages, each a function of what the one before returned:

1. :mod:`.tables` reads the CV folder (cv.json; each fold's done.json, oof.csv, test.csv,
   oof_confusion.json, metrics.csv) and the shards (the truth) into tables; :mod:`.scores` turns
   them into each fold's row and each grid point's block, and ranks the points (one order for the
   best point and the grid table: lowest mean validation KL, complete points first);
2. :mod:`.correct` scores the corrections of the best point's out-of-fold predictions cross-fitted
   (calibration, second stage), chooses the one the submission takes, if any, and scores that
   choice nested (made for each fold on the other folds alone);
3. :mod:`.write` writes the oof tables, the submission, the plots (:mod:`.figures`), report.json
   and report.md (:mod:`.text`, which also renders the summaries that the commands print).
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import correct, scores, tables, write
from .text import summary, summary_line

__all__ = ["build", "run", "summary", "summary_line"]


def build(cv_dir) -> dict:
    """Write oof.csv files, submission.csv, report.json, report.md and plots; return the report."""
    folder = tables.read_folder(cv_dir)
    blocks = [scores.point_block(p, folder.truth) for p in folder.points]
    best = scores.best_point(blocks)
    corrections = correct.corrections(folder.plan, folder.point(best["name"]), best["oof_kl"], folder.truth)
    return write.write_report(folder, blocks, best, corrections)


def run(args) -> int:
    """``dist-lc report CVDIR``: exit 0 when every fold is finished, 1 for a partial report."""
    report = build(Path(args.cv_dir))
    print(summary_line(report))
    if not report["complete"]:
        print("report: some folds are not finished; the scores cover the finished ones", file=sys.stderr)
        return 1
    return 0
