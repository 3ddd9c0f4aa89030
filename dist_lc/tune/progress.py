"""A trial's scores, read from the files its fold jobs leave: the intermediate values the pruner
judges and the objective.

Steps (Optuna's, from 0) count validated epochs, the same way in every trial of a study, so that the
pruner compares like with like:

* sequential folds (fold i of the order, epoch e of ``E = steps_per_fold``): step ``i·E + e - 1``,
  the mean of the finished folds' best KL and the running fold's best KL so far; a fold that ends
  reports its best at the last step of its block, and at every step of it after its last
  validation when it stopped early. A fold's first
  ``warmup`` epochs are not reported, in every fold: after them the mean would otherwise judge
  how fast the next fold starts (the pruner's own warm-up spares the first fold only);
* parallel folds: step ``e - 1`` once every fold has passed epoch e (or finished), the mean of the
  folds' best KL so far.

The objective is the mean of ``best_val_kl`` (done.json) over the trial's folds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from lc_common.records import read_json_object

from ..cv.plan import DONE, Plan
from ..run_log import read_metrics


@dataclass
class FoldScores:
    """One fold of a trial as its run folder shows it now."""
    fold: int
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, best val_kl up to it), validated epochs
    epochs_seen: int = 0                                           # the last epoch metrics.csv holds
    done: dict | None = None                                       # done.json

    @property
    def best(self) -> float | None:
        """The fold's result: done.json's best_val_kl (None while it runs, or when not a finite number)."""
        if self.done is None:
            return None
        value = self.done.get("best_val_kl")
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def best_up_to(self, epoch: int) -> float | None:
        """The lowest val_kl of the validations up to ``epoch`` (None before the first)."""
        values = [kl for e, kl in self.curve if e <= epoch]
        return min(values) if values else None


def read_fold(run_dir: Path, fold: int) -> FoldScores:
    scores = FoldScores(fold)
    done = Path(run_dir) / DONE
    if done.exists():
        scores.done = read_json_object(done, "fold result")
    best = math.inf
    for row in read_metrics(run_dir):
        epoch = int(row["epoch"])
        scores.epochs_seen = max(scores.epochs_seen, epoch)
        text = (row.get("val_kl") or "").strip()
        value = float(text) if text else math.nan
        if math.isfinite(value):       # "" where an epoch skipped validation
            best = min(best, value)
            scores.curve.append((epoch, best))
    return scores


def read_trial(plan: Plan) -> list[FoldScores]:
    """Every fold of the trial's CV folder, in the plan's order."""
    point = plan.points[0]
    return [read_fold(plan.run_dir(point, k), k) for k in plan.folds]


def intermediate(folds: list[FoldScores], order: str, steps_per_fold: int, warmup: int = 0) -> dict[int, float]:
    """{step: value} of what the folds show so far (see the module's docstring)."""
    if order == "sequential":
        return _sequential(folds, steps_per_fold, warmup)
    return _parallel(folds, steps_per_fold)


def _sequential(folds: list[FoldScores], width: int, warmup: int) -> dict[int, float]:
    steps, earlier = {}, []
    for i, fold in enumerate(folds):
        for epoch, best in fold.curve:
            if epoch > warmup:
                steps[i * width + min(epoch, width) - 1] = statistics.fmean([*earlier, best])
        if fold.best is None:
            break                      # the folds after a running one have not started
        earlier.append(fold.best)
        # a fold that stopped early (time limit, early stop) fills the rest of its block: the median
        # compares a step's value with the completed trials' at that very step, and one without it
        # would leave them out there
        last = max((min(epoch, width) for epoch, _ in fold.curve), default=0)
        for epoch in range(max(last + 1, warmup + 1), width + 1):
            steps[i * width + epoch - 1] = statistics.fmean(earlier)
        steps[(i + 1) * width - 1] = statistics.fmean(earlier)
    return steps


def _parallel(folds: list[FoldScores], width: int) -> dict[int, float]:
    steps = {}
    for epoch in range(1, width + 1):
        if not all(f.done is not None or f.epochs_seen >= epoch for f in folds):
            break                      # a fold has not reached this epoch: the step waits for it
        values = [f.best if f.done is not None and f.best is not None and f.epochs_seen <= epoch
                  else f.best_up_to(epoch) for f in folds]
        if all(v is not None for v in values):
            steps[epoch - 1] = statistics.fmean(values)
    return steps


def fold_results(folds: list[FoldScores]) -> list[float]:
    """The best KL of each finished fold."""
    return [f.best for f in folds if f.best is not None]


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None where there are too few values)."""
    mean = statistics.fmean(values) if values else None
    std = statistics.stdev(values) if len(values) >= 2 else None
    return mean, std
