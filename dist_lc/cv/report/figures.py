"""The report's plots (``plots/*.png`` of the CV folder), drawn from stage 1's learning curves and
the report's blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ...metrics import SCORED_NAMES
from ...plots import save_figure
from .tables import PointTables
from .text import fmt


def draw(plots: Path, points: list[PointTables], blocks: list[dict], best: dict, grid: bool) -> list[str]:
    """Every plot of the report into the folder ``plots``; their paths relative to the CV folder."""
    names = []
    for tables in points:
        name = f"learning_curves{'_' + tables.point.name if tables.point.name else ''}.png"
        plot_learning_curves(tables, plots / name)
        names.append(name)
    plot_fold_scores(best, plots / "fold_scores.png")
    plot_per_class(best, plots / "per_class.png")
    names += ["fold_scores.png", "per_class.png"]
    if best.get("oof_confusion") is not None:
        plot_confusion(best, plots / "confusion.png")
        names.append("confusion.png")
    if grid:
        plot_grid(blocks, plots / "grid_scores.png")
        names.append("grid_scores.png")
    return [f"plots/{n}" for n in names]


def _value(x) -> float:
    """A score as matplotlib takes it: None (not scored) as NaN, which draws nothing."""
    return np.nan if x is None else float(x)


def _series(rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    """(epochs, values) of a metrics.csv column, skipping epochs without it (train.val_every)."""
    kept = [r for r in rows if r.get(column)]
    return [int(r["epoch"]) for r in kept], [float(r[column]) for r in kept]


def plot_learning_curves(tables: PointTables, path: Path) -> None:
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_kl = fig.subplots(1, 2)
    for k, rows in tables.curves.items():
        if not rows:
            continue
        line, = ax_loss.plot(*_series(rows, "train_loss"), marker=".", label=f"fold {k} train")
        ax_loss.plot(*_series(rows, "val_loss"), ls="--", color=line.get_color(), label=f"fold {k} val")
        ax_kl.plot(*_series(rows, "val_kl"), marker=".", color=line.get_color(), label=f"fold {k}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss per epoch")
    ax_kl.set(xlabel="epoch", ylabel="validation KL", title="validation KL per epoch")
    for ax in (ax_loss, ax_kl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:   # no fold has curves: no legend (and no warning on stderr)
            ax.legend(fontsize=7)
    fig.suptitle(f"learning curves {tables.point.name}".strip())
    _save(fig, path)


def plot_fold_scores(block: dict, path: Path) -> None:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    folds = [r["fold"] for r in block["folds"]]
    ax.bar([str(k) for k in folds], [_value(r["best_val_kl"]) for r in block["folds"]], color="tab:blue",
           label="best val KL")
    if np.isfinite(_value(block["mean_kl"])):
        ax.axhline(block["mean_kl"], color="k", label=f"mean {fmt(block['mean_kl'])}")
    if np.isfinite(_value(block["baseline_kl"])):
        ax.axhline(block["baseline_kl"], color="tab:red", ls="--", label=f"baseline {fmt(block['baseline_kl'])}")
    ax.set(xlabel="fold", ylabel="KL (lower is better)", title="per-fold best validation score")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_per_class(block: dict, path: Path) -> None:
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    x = np.arange(len(SCORED_NAMES))
    ax.bar(x - 0.2, [block["per_class"].get(c, 0) for c in SCORED_NAMES], 0.4, label=f"oof {fmt(block['oof_kl'])}")
    ax.bar(x + 0.2, [block["baseline_per_class"].get(c, 0) for c in SCORED_NAMES], 0.4,
           label=f"baseline {fmt(block['baseline_kl'])}", color="tab:gray")
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
    ax.set(xlabel="predicted", ylabel="true", title=f"out-of-fold pixels (mIoU {fmt(miou)})")
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_grid(blocks: list[dict], path: Path) -> None:
    shown = [b for b in blocks if np.isfinite(_value(b["mean_kl"]))]
    fig = Figure(figsize=(max(6, len(shown)), 4))
    ax = fig.subplots()
    # no error bar for a point with one finished fold: its std is None, not 0
    ax.errorbar(range(len(shown)), [b["mean_kl"] for b in shown], yerr=[_value(b["std_kl"]) for b in shown],
                fmt="o", capsize=4)
    ax.set_xticks(range(len(shown)), [b["name"] for b in shown], rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="mean validation KL ± std", title="grid points")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
