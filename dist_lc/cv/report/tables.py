"""Stage 1 of the report: a CV folder read into tables. Nothing is scored, fitted or written here
but the two caches of what the shards hold.

From the folder: each planned fold's ``done.json`` (a fold is finished iff it is there), its
``oof.csv`` (its held-out tiles as its best checkpoint predicted them), ``oof_confusion.json``,
``test.csv`` and ``metrics.csv``. From the shards: every train tile's true proportions and fold
(cached as ``truth.csv``) and, for the second stage only, every tile's cheap features (cached as
``tile_features.csv``).

A damaged or foreign file of a finished fold (its done.json without the figures the report reads,
an oof.csv or test.csv that ``dist-lc eval`` would refuse, a confusion matrix of another shape,
out-of-fold tiles that are not that fold's train tiles, test tiles that differ from fold to fold) is
an InputError naming the file.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from lc_common.atomic import write_bytes_atomic, write_csv_atomic
from lc_common.errors import InputError
from lc_common.records import read_json_object
from lc_common.tiles import CLASS_NAMES
from shard_tools import tarstream
from shard_tools.format import decode_sample
from shard_tools.manifest import load_manifest

from ... import pixel_metrics, tile_features
from ...evaluate import few, read_predictions
from ...run_log import read_metrics
from ..plan import CONFUSION, DONE, OOF, TEST, Plan, Point, load_plan

CLASSES = list(CLASS_NAMES)
TRUTH, FEATURES = "truth.csv", "tile_features.csv"


@dataclass(frozen=True)
class FoldTables:
    """A finished fold: what its done.json says and what its best checkpoint predicted."""
    fold: int
    run_dir: Path
    done: dict                     # done.json
    oof: pd.DataFrame              # its held-out tiles
    confusion: np.ndarray | None   # their pixel confusion matrix (folds written before it existed have none)
    test: pd.DataFrame | None      # the test tiles (none when the shards hold no test split)


@dataclass(frozen=True)
class PointTables:
    """One grid point's finished folds, the planned folds not finished, and every fold's learning curve."""
    point: Point
    folds: list[FoldTables]          # in the plan's order
    missing: list[int]
    curves: dict[int, list[dict]]    # every planned fold's metrics.csv rows ([] before its first epoch)
    oof: pd.DataFrame | None         # every finished fold's held-out tiles; None when no fold is finished


@dataclass(frozen=True)
class CVTables:
    plan: Plan
    truth: pd.DataFrame              # per train tile: "fold", then the true proportions
    points: list[PointTables]        # in the plan's order
    block_size: int | None           # train tiles of consecutive ids per fold block (None: a pack before blocks)

    def point(self, name: str) -> PointTables:
        return next(p for p in self.points if p.point.name == name)


def read_folder(cv_dir) -> CVTables:
    """The plan, every grid point's tables and the truth; one error when no fold has finished."""
    plan = load_plan(cv_dir)
    points = [read_point(plan, p) for p in plan.points]
    if not any(p.folds for p in points):
        raise InputError(f"{plan.cv_dir}: no fold has finished yet (no done.json); nothing to report")
    shards = plan.config.data.shards
    truth = read_truth(plan.cv_dir, shards)
    facts = read_shard_facts(shards)
    for fold in (f for p in points for f in p.folds):
        check_oof_tiles(fold, truth, shards)
        check_test_of_shards(fold, facts.test_ids, shards)
    return CVTables(plan, truth, points, facts.block_size)


def read_point(plan: Plan, point: Point) -> PointTables:
    done = {k: plan.is_done(point, k) for k in plan.folds}   # looked at once: a running fold may finish meanwhile
    finished = [read_fold(plan.run_dir(point, k), k) for k in plan.folds if done[k]]
    missing = [k for k in plan.folds if not done[k]]
    curves = {k: read_metrics(plan.run_dir(point, k)) for k in plan.folds}
    oof = pd.concat([f.oof for f in finished]) if finished else None
    check_test_tiles(finished)
    return PointTables(point, finished, missing, curves, oof)


def read_fold(run_dir: Path, fold: int) -> FoldTables:
    test = run_dir / TEST
    return FoldTables(fold, run_dir, read_done(run_dir / DONE), read_pred(run_dir / OOF),
                      read_confusion(run_dir), read_pred(test) if test.exists() else None)


# done.json's figures that the report reads: the number ones, and those of them that may be null (a
# training without a validation has no best score)
DONE_NUMBERS = ("best_val_kl", "final_train_loss", "train_s", "predict_s")
DONE_NULLABLE = ("best_val_kl", "final_train_loss")
DONE_OTHERS = ("best_epoch", "epochs", "epochs_done", "world_size")
TIMELINE_NUMBERS = ("epochs_s", "job_s")   # what report.md computes with, where a timeline has them


def read_done(path: Path) -> dict:
    """A fold's done.json, with the figures the report reads."""
    done = read_json_object(path, "fold result")
    missing = [k for k in (*DONE_NUMBERS, *DONE_OTHERS) if k not in done]
    if missing:
        raise InputError(f"{path}: fold result without {', '.join(missing)}")
    timeline = done.get("timeline")
    if timeline is not None and not isinstance(timeline, dict):
        raise InputError(f"{path}: fold result's timeline is not a JSON object")
    values = {k: done[k] for k in DONE_NUMBERS} | {f"timeline.{k}": v for k, v in (timeline or {}).items()
                                                    if k in TIMELINE_NUMBERS}
    for key, value in values.items():
        if not (_is_number(value) or (value is None and key in DONE_NULLABLE)):
            raise InputError(f"{path}: fold result's {key} is not a number ({json.dumps(value)[:40]})")
        if key not in DONE_NULLABLE and _is_number(value) and not math.isfinite(value):   # times: NaN is no time
            raise InputError(f"{path}: fold result's {key} is not a finite number ({json.dumps(value)})")
    return done


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_pred(path: Path) -> pd.DataFrame:
    """A fold's predictions (oof.csv, test.csv), the 10 classes by tile id, checked as ``dist-lc eval``
    checks a prediction."""
    return read_predictions(path, CLASSES, text_ids=True)


def read_confusion(run_dir: Path) -> np.ndarray | None:
    """A fold's pixel confusion matrix (scored classes × scored classes); None when the fold has none."""
    path = run_dir / CONFUSION
    if not path.exists():
        return None
    data = read_json_object(path, "confusion matrix")
    try:
        matrix = np.asarray(data["matrix"], dtype=np.int64)
    except KeyError:
        raise InputError(f"{path}: unreadable confusion matrix (no \"matrix\" in it)") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{path}: unreadable confusion matrix ({type(exc).__name__}: {exc})") from None
    expected = (pixel_metrics.N, pixel_metrics.N)
    if matrix.shape != expected:
        raise InputError(f"{path}: confusion matrix of shape {matrix.shape}, expected {expected}")
    return matrix


def check_oof_tiles(fold: FoldTables, truth: pd.DataFrame, shards) -> None:
    """A fold's out-of-fold tiles are train tiles of the shards, of that fold (anything else would be
    scored against another fold's baseline, or not at all)."""
    path, ids = fold.run_dir / OOF, fold.oof.index
    unknown = ids.difference(truth.index, sort=False)
    if len(unknown):
        raise InputError(f"{path}: {len(unknown)} sample_id(s) not among the train tiles of {shards}: {few(unknown)}")
    elsewhere = ids[truth.loc[ids, "fold"].to_numpy() != fold.fold]
    if len(elsewhere):
        raise InputError(f"{path}: {len(elsewhere)} sample_id(s) of other folds than {fold.fold}: {few(elsewhere)}")
    held_out = truth.index[truth["fold"].to_numpy() == fold.fold]
    missing = held_out.difference(ids, sort=False)
    if len(missing):   # every score, fit and choice would quietly run on the tiles left
        raise InputError(f"{path}: {len(missing)} of fold {fold.fold}'s {len(held_out)} tiles not predicted: "
                         f"{few(missing)}")


def check_test_of_shards(fold: FoldTables, test_ids: set[str], shards) -> None:
    """A fold's test.csv predicts the shards' test tiles as they are now: after the shards were packed
    again with other test tiles, the submission would hold the old ones (or the second stage find no
    features for them)."""
    if fold.test is not None and set(fold.test.index) != test_ids:
        raise InputError(f"{fold.run_dir / TEST}: not the test tiles of {shards} "
                         f"({_difference(test_ids, fold.test.index)}); were the shards packed again since?")


def check_test_tiles(folds: list[FoldTables]) -> None:
    """Every fold's test.csv predicts the same tiles (the submission is their mean, tile by tile)."""
    tests = [f for f in folds if f.test is not None]
    for f in tests[1:]:
        if set(f.test.index) != set(tests[0].test.index):
            raise InputError(f"{f.run_dir / TEST}: not the test tiles of {tests[0].run_dir / TEST} "
                             f"({_difference(tests[0].test.index, f.test.index)})")


def _difference(expected, found) -> str:
    """'N missing, M extra: a few of them' between two sets of tile ids."""
    expected, found = set(expected), set(found)
    lacks, extra = sorted(expected - found), sorted(found - expected)
    return f"{len(lacks)} missing, {len(extra)} extra: {few([*lacks, *extra])}"


# ----------------------------------------------------------------------------- from the shards

@dataclass(frozen=True)
class ShardFacts:
    test_ids: set[str]        # what every fold's test.csv must predict
    block_size: int | None    # how the folds were drawn (``lc-shard pack --block-size``)


def read_shard_facts(shards) -> ShardFacts:
    manifest = load_manifest(shards)
    return ShardFacts({str(k) for entry in manifest.shards("test") for k in entry["keys"]},
                      manifest.data.get("block_size"))


def read_truth(cv_dir: Path, shards) -> pd.DataFrame:
    """True proportions and fold of every train tile (from the shards; cached in truth.csv)."""
    manifest = load_manifest(shards)

    def from_shards() -> pd.DataFrame:
        props = {}
        for entry in manifest.shards("train"):
            props.update(_props_of_shard(manifest, entry))
        ids = list(props)
        truth = pd.DataFrame(np.stack([props[i] for i in ids]), index=pd.Index(ids, name="sample_id"),
                             columns=CLASSES)
        truth.insert(0, "fold", [int(manifest.data["folds"][i]) for i in ids])
        return truth

    return _cached(cv_dir / TRUTH, manifest, len(manifest.data["folds"]), from_shards)


def _props_of_shard(manifest, entry: dict) -> dict[str, np.ndarray]:
    """``{id: proportions}`` from a train shard's ``.props.npy`` members (a local shard is read by seeking
    over the images; a URL is streamed)."""
    with manifest.root.open(entry["name"]) as stream:
        return {raw["__key__"]: np.load(io.BytesIO(raw["props.npy"]))
                for raw in tarstream.samples(stream, wanted={"props.npy"}, seekable=not manifest.root.remote)}


def read_tile_features(cv_dir: Path, shards) -> pd.DataFrame:
    """Every tile's cheap features (:mod:`dist_lc.tile_features`), from one pass over the shards'
    images; cached in the CV folder as tile_features.csv."""
    manifest = load_manifest(shards)

    def from_shards() -> pd.DataFrame:
        keys, values = tile_features.features(_images(manifest))
        return pd.DataFrame(values, index=pd.Index(keys, name="sample_id"), columns=tile_features.names())

    return _cached(cv_dir / FEATURES, manifest, sum(s["count"] for s in manifest.data["shards"]), from_shards)


def _images(manifest):
    """``(id, image, is a train tile)`` of every tile of the shards, train and test."""
    for entry in manifest.data["shards"]:
        with manifest.root.open(entry["name"]) as stream:
            for raw in tarstream.samples(stream, wanted={"image.npy"}, seekable=not manifest.root.remote):
                key, image, _, _ = decode_sample(raw)
                yield key, image, entry["split"] == "train"


def _cached(path: Path, manifest, rows: int, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table cached at ``path`` while it has ``rows`` rows (one per tile of the shards) and was
    computed from shards of the same content (``manifest.identity``, kept beside it: shards packed
    again with other tiles but as many of them would otherwise pass), else ``compute()``'s, cached
    (a cache that cannot be read is computed again)."""
    source = path.with_name(path.name + ".source")
    if path.exists() and source.is_file() and source.read_text().strip() == manifest.identity:
        try:
            table = pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id")
        except (OSError, UnicodeDecodeError, ValueError, KeyError):   # pandas' parse errors are ValueErrors
            table = None
        if table is not None and len(table) == rows:
            return table
    table = compute()
    source.unlink(missing_ok=True)   # the table first, then what it was computed from
    write_csv_atomic(path, table.reset_index())
    write_bytes_atomic(source, f"{manifest.identity}\n".encode())
    return table
