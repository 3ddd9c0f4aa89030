"""Stage 1 of the report: a CV folder read into tables. Nothing is scored, fitted or written here
but the two caches of what the shards hold.

From the folder: each planned fold's ``done.json`` (a fold is finished iff it is there), its
``oof.csv`` (its held-out tiles as its best checkpoint predicted them), ``oof_confusion.json``,
``test.csv`` and ``metrics.csv``. From the shards: every train tile's true proportions and fold
(cached as ``truth.csv``) and, for the second stage only, every tile's cheap features (cached as
``tile_features.csv``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from lc_common.atomic import write_csv_atomic
from lc_common.errors import InputError
from lc_common.records import read_json_object
from lc_common.tiles import CLASS_NAMES
from shard_tools import tarstream
from shard_tools.format import decode_sample
from shard_tools.manifest import load_manifest

from ... import tile_features
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

    def point(self, name: str) -> PointTables:
        return next(p for p in self.points if p.point.name == name)


def read_folder(cv_dir) -> CVTables:
    """The plan, every grid point's tables and the truth; one error when no fold has finished."""
    plan = load_plan(cv_dir)
    points = [read_point(plan, p) for p in plan.points]
    if not any(p.folds for p in points):
        raise InputError(f"{plan.cv_dir}: no fold has finished yet (no done.json); nothing to report")
    return CVTables(plan, read_truth(plan.cv_dir, plan.config.data.shards), points)


def read_point(plan: Plan, point: Point) -> PointTables:
    done = {k: plan.is_done(point, k) for k in plan.folds}   # looked at once: a running fold may finish meanwhile
    finished = [read_fold(plan.run_dir(point, k), k) for k in plan.folds if done[k]]
    missing = [k for k in plan.folds if not done[k]]
    curves = {k: read_metrics(plan.run_dir(point, k)) for k in plan.folds}
    oof = pd.concat([f.oof for f in finished]) if finished else None
    return PointTables(point, finished, missing, curves, oof)


def read_fold(run_dir: Path, fold: int) -> FoldTables:
    test = run_dir / TEST
    return FoldTables(fold, run_dir, read_json_object(run_dir / DONE, "fold result"), read_pred(run_dir / OOF),
                      read_confusion(run_dir), read_pred(test) if test.exists() else None)


def read_pred(path: Path) -> pd.DataFrame:
    return _read_table(path)[CLASSES]


def _read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"sample_id": str}).set_index("sample_id")


def read_confusion(run_dir: Path) -> np.ndarray | None:
    path = run_dir / CONFUSION
    return np.asarray(read_json_object(path, "confusion matrix")["matrix"], dtype=np.int64) if path.exists() else None


# ----------------------------------------------------------------------------- from the shards

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

    return _cached(cv_dir / TRUTH, len(manifest.data["folds"]), from_shards)


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

    return _cached(cv_dir / FEATURES, sum(s["count"] for s in manifest.data["shards"]), from_shards)


def _images(manifest):
    """``(id, image, is a train tile)`` of every tile of the shards, train and test."""
    for entry in manifest.data["shards"]:
        with manifest.root.open(entry["name"]) as stream:
            for raw in tarstream.samples(stream, wanted={"image.npy"}, seekable=not manifest.root.remote):
                key, image, _, _ = decode_sample(raw)
                yield key, image, entry["split"] == "train"


def _cached(path: Path, rows: int, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """The table cached at ``path`` while it has ``rows`` rows (one per tile of the shards; its only
    check), else ``compute()``'s, cached."""
    if path.exists():
        table = _read_table(path)
        if len(table) == rows:
            return table
    table = compute()
    write_csv_atomic(path, table.reset_index())
    return table
