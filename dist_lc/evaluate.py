"""Score a prediction CSV against a ground-truth CSV with the challenge's KL (``dist-lc eval``).

Both files: ``sample_id`` then the 10 class columns (extra columns are ignored). Rows are matched by
``sample_id``, in any order; every id must be in both files exactly once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shard_tools.errors import InputError
from shard_tools.format import CLASS_NAMES
from shard_tools.manifest import write_json_atomic

from .metrics import SCORED_CLASSES, kl_per_class, kl_score

ID = "sample_id"
COLUMNS = (ID, *CLASS_NAMES)
SHOWN_IDS = 5


def _few(ids) -> str:
    """Up to SHOWN_IDS ids, then how many more."""
    ids = list(ids)
    text = ", ".join(map(str, ids[:SHOWN_IDS]))
    return text + (f" (and {len(ids) - SHOWN_IDS} more)" if len(ids) > SHOWN_IDS else "")


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise InputError(f"{path}: file does not exist")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        df = pd.read_csv(path, dtype={ID: str})
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"{path}: not a CSV file ({type(exc).__name__})") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in COLUMNS if c not in df.columns]
    if len(missing) == len(COLUMNS):
        raise InputError(f"{path}: not a proportions CSV (no {ID} nor class column in its header)")
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def _check_ids(df: pd.DataFrame, path: Path) -> None:
    ids = df[ID]
    if ids.isna().any():
        raise InputError(f"{path}: empty {ID} on data row(s) {_few(np.flatnonzero(ids.isna()) + 1)}")
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise InputError(f"{path}: duplicate {ID}(s) {_few(dup)}")


def _check_values(values: pd.DataFrame, path: Path) -> np.ndarray:
    """Class columns as float64 (n, 10); NaN, non-numeric, infinite and negative values are refused."""
    numeric = values.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numeric)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise InputError(f"{path}: {ID} {values.index[row]}: missing, non-numeric or infinite value "
                         f"in column {values.columns[col]} ({bad.any(axis=1).sum()} row(s) affected)")
    negative = (numeric < 0).any(axis=1)
    if negative.any():
        raise InputError(f"{path}: negative proportion(s) for {ID} {_few(values.index[negative])}")
    zero = numeric[:, list(SCORED_CLASSES)].sum(axis=1) == 0
    if zero.any():
        raise InputError(f"{path}: row sums to 0 over the scored classes for {ID} {_few(values.index[zero])}")
    return numeric


def load_proportions(path) -> pd.DataFrame:
    """A checked proportions CSV: float64 DataFrame indexed by ``sample_id`` (str), the 10 class columns."""
    path = Path(path)
    df = _read_csv(path)
    df[ID] = df[ID].str.strip()
    _check_ids(df, path)
    values = df.set_index(ID)[list(CLASS_NAMES)]
    return pd.DataFrame(_check_values(values, path), index=values.index, columns=list(CLASS_NAMES))


def _match(gt: pd.DataFrame, pred: pd.DataFrame, gt_path, pred_path) -> pd.DataFrame:
    """Ground-truth rows of the predicted ids, in the prediction's order.

    Every predicted id must be in the ground truth (the challenge errs otherwise); the ground truth
    may hold more ids (e.g. the whole train_labels.csv against one fold's predictions).
    """
    extra = pred.index.difference(gt.index, sort=False)
    if len(extra):
        raise InputError(f"{pred_path}: {len(extra)} {ID}(s) not in the ground truth {gt_path}: {_few(extra)}")
    return gt.loc[pred.index]


def evaluate_csv(gt_path, pred_path) -> dict:
    """``{"kl": score, "per_class": {class name: contribution}, "n": rows}`` (contributions sum to kl)."""
    gt = load_proportions(gt_path)
    pred = load_proportions(pred_path)
    gt = _match(gt, pred, gt_path, pred_path)
    y_true, y_pred = gt.to_numpy(), pred.to_numpy()
    return {"kl": kl_score(y_true, y_pred), "per_class": kl_per_class(y_true, y_pred), "n": len(pred)}


def format_report(result: dict) -> str:
    """The score, then an aligned table of per-class contributions and their share of the score."""
    width = max(len(name) for name in result["per_class"])
    lines = [f"KL divergence (challenge score): {result['kl']:.6f}   ({result['n']} tiles)",
             f"{'class':<{width}}  {'contribution':>12}  {'share':>7}"]
    for name, value in result["per_class"].items():
        share = f"{100 * value / result['kl']:6.1f}%" if result["kl"] > 0 else f"{'-':>7}"
        lines.append(f"{name:<{width}}  {value:>12.6f}  {share}")
    return "\n".join(lines)


def run(args) -> int:
    """CLI entry: ``args.gt``, ``args.pred``, optional ``args.out`` (JSON). Returns the exit status 0."""
    out = getattr(args, "out", None)
    if out is not None and not Path(out).parent.is_dir():
        raise InputError(f"{out}: folder {Path(out).parent} does not exist")
    result = evaluate_csv(args.gt, args.pred)
    print(format_report(result))
    if out is not None:
        record = {**result, "gt": str(Path(args.gt).resolve()), "pred": str(Path(args.pred).resolve())}
        write_json_atomic(out, record)
        print(f"wrote {out}")
    return 0
