"""Score a prediction CSV against a ground-truth CSV with the challenge's KL (``dist-lc eval``).

It accepts the files that the challenge's own evaluation (``framework/eval.py`` of
preligens-lab/challenge-ens) accepts, scores them the same, and refuses what it refuses, each with
one line naming the file and the problem:

- both files are read as that script reads them (``pd.read_csv(path, index_col=0)``): the first
  column holds the tile ids, whatever its name, and ids are matched as pandas parses them;
- the scored columns are the ground truth's minus ``no_data`` and ``clouds``; the prediction must
  have each of them (it may leave out ``no_data`` and ``clouds``; other columns are ignored);
- every predicted id must be in the ground truth once, and the prediction must not be empty nor
  name an id twice; only the predicted ids of the ground truth are used;
- a value that is missing, not a number, infinite or negative, and a row whose scored classes sum
  to 0, make the score NaN in that script, which then refuses the file: refused here too, by id.

One deliberate difference: a ground truth with columns that are not the challenge's classes is
refused here, where that script would score them as classes if the prediction had them too.

:func:`read_predictions` is the one reader of a prediction CSV with these checks: the CV report reads
its folds' oof.csv and test.csv through it too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lc_common.errors import InputError, one_line
from lc_common.tiles import CLASS_NAMES, IGNORED_CLASSES

from lc_common.atomic import check_parent, write_json_atomic
from .metrics import SCORED_NAMES, kl_per_class, kl_score

ID = "sample_id"
DROPPED = tuple(CLASS_NAMES[c] for c in IGNORED_CLASSES)
SHOWN_IDS = 5


def few(ids) -> str:
    """Up to SHOWN_IDS ids, then how many more."""
    ids = list(ids)
    text = ", ".join(map(str, ids[:SHOWN_IDS]))
    return text + (f" (and {len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


def read_table(path, text_ids: bool = False) -> pd.DataFrame:
    """A proportions CSV as the challenge's script reads it: indexed by its first column (kept as
    text with ``text_ids``: the CV folder's ids are matched to the shards' keys as written)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        df = pd.read_csv(path, index_col=0, converters={0: str} if text_ids else None)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise InputError(f"{path}: not a CSV file ({type(exc).__name__})") from None
    except OSError as exc:   # there but unreadable: permissions, an I/O error
        raise InputError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
    names = [str(c) for c in df.columns]
    if str(df.index.name) in CLASS_NAMES:
        raise InputError(f"{path}: missing column {ID}: the first column must hold the tile ids, "
                         f"not the class {df.index.name!r}")
    if not set(names) & set(CLASS_NAMES):
        raise InputError(f"{path}: not a proportions CSV (no class column in its header)")
    return df


def _scored_columns(gt: pd.DataFrame, path) -> list[str]:
    columns = [c for c in gt.columns if c not in DROPPED]
    unknown = [c for c in columns if c not in SCORED_NAMES]
    if unknown:
        raise InputError(f"{path}: column(s) {', '.join(map(repr, unknown))} are not classes of the challenge")
    missing = [c for c in SCORED_NAMES if c not in columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return list(SCORED_NAMES)


def _columns_of(pred: pd.DataFrame, columns: list[str], path) -> pd.DataFrame:
    missing = [c for c in columns if c not in pred.columns]
    if missing:
        spaced = [c for c in pred.columns if str(c).strip() in missing and c != str(c).strip()]
        hint = f" (column {spaced[0]!r} has spaces around its name)" if spaced else ""
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}{hint}")
    return pred[columns]


def _values(table: pd.DataFrame, path) -> np.ndarray:
    """Float64 values; missing, non-numeric, infinite, negative values and rows whose scored classes
    sum to 0 refused by id."""
    numeric = table.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numeric)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"{path}: {ID} {table.index[row]}: missing, non-numeric or infinite value "
                         f"in column {table.columns[col]} ({bad.any(axis=1).sum()} row(s) affected)")
    negative = (numeric < 0).any(axis=1)
    if negative.any():
        raise InputError(f"{path}: negative proportion(s) for {ID} {few(table.index[negative])}")
    scored = [i for i, c in enumerate(table.columns) if c in SCORED_NAMES]
    zero = numeric[:, scored].sum(axis=1) == 0
    if zero.any():
        raise InputError(f"{path}: row sums to 0 over the scored classes for {ID} {few(table.index[zero])}")
    return numeric


def read_predictions(path, columns=SCORED_NAMES, text_ids: bool = False) -> pd.DataFrame:
    """The prediction CSV at ``path``, its ``columns`` as float64 by tile id: refused in one line
    naming the file when it is not a CSV, has no row, an empty or repeated id, lacks one of
    ``columns``, or holds a value there that is missing (a short row), not a number, infinite or
    negative, or a row whose scored classes sum to 0."""
    pred = read_table(path, text_ids)
    if len(pred) == 0:
        raise InputError(f"{path}: no prediction rows (only a header)")
    empty = pred.index.isna() | (pred.index.astype(str) == "")   # "" is how text ids read an empty cell
    if empty.any():
        raise InputError(f"{path}: empty {ID} on data row(s) {few(np.flatnonzero(empty) + 1)}")
    dup = pred.index[pred.index.duplicated()].unique()
    if len(dup):
        raise InputError(f"{path}: duplicate {ID}(s) {few(dup)}")
    table = _columns_of(pred, list(columns), path)
    return pd.DataFrame(_values(table, path), index=pred.index.rename(ID), columns=list(columns))


def matched(gt_path, pred_path) -> tuple[np.ndarray, np.ndarray, pd.Index]:
    """(truth, prediction) over the 8 scored classes, rows in the prediction's order, and the ids."""
    gt = read_table(gt_path)
    columns = _scored_columns(gt, gt_path)
    pred = read_predictions(pred_path, columns)
    extra = pred.index.difference(gt.index, sort=False)
    if len(extra):
        raise InputError(f"{pred_path}: {len(extra)} {ID}(s) not in the ground truth {gt_path}: {few(extra)}")
    twice = gt.index[gt.index.duplicated()].unique().intersection(pred.index)
    if len(twice):
        raise InputError(f"{gt_path}: duplicate {ID}(s) {few(twice)}")
    truth = gt.loc[pred.index, columns]
    return _values(truth, gt_path), pred.to_numpy(), pred.index


def evaluate_csv(gt_path, pred_path) -> dict:
    """``{"kl": score, "per_class": {class name: contribution}, "n": rows}`` (contributions sum to kl)."""
    y_true, y_pred, ids = matched(gt_path, pred_path)
    return {"kl": kl_score(y_true, y_pred), "per_class": kl_per_class(y_true, y_pred), "n": len(ids)}


def format_report(result: dict) -> str:
    """The score, then an aligned table of per-class contributions and their share of the score."""
    width = max(len(name) for name in result["per_class"])
    lines = [f"KL divergence (challenge score): {result['kl']:.6f}   ({result['n']} tiles)",
             f"{'class':<{width}}  {'contribution':>12}  {'share':>7}"]
    for name, value in result["per_class"].items():
        share = f"{100 * value / result['kl']:6.1f}%" if result["kl"] > 0 else f"{'-':>7}"
        lines.append(f"{name:<{width}}  {value:>12.6f}  {share}")
    if any(value < 0 for value in result["per_class"].values()):
        lines.append("(negative: where present, the class is predicted above its true share, its terms "
                     "y·log(y/q) below 0; the contributions add up to the score)")
    return "\n".join(lines)


def run(args) -> int:
    """CLI entry: ``args.gt``, ``args.pred``, optional ``args.out`` (JSON). Returns the exit status 0."""
    out = getattr(args, "out", None)
    if out is not None:
        check_parent(out, "--out")
    result = evaluate_csv(args.gt, args.pred)
    print(format_report(result))
    if out is not None:
        record = {**result, "gt": str(Path(args.gt).resolve()), "pred": str(Path(args.pred).resolve())}
        write_json_atomic(out, record)
        print(f"wrote {out}")
    return 0
