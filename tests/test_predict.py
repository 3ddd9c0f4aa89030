"""predict: the submission CSV from checkpoints (ensembles, TTA, several ranks) and its bad input."""
from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
import torch

from lc_common.errors import InputError
from lc_common.tiles import CLASS_NAMES
from shard_tools.manifest import load_manifest
from dist_lc.evaluate import evaluate_csv
from dist_lc.predict import predict
from lc_common.atomic import write_csv_atomic

from torchrun_util import dist_lc, torchrun


def best(run):
    return run / "checkpoints" / "best.pt"


def check_submission(table: pd.DataFrame, ids):
    assert list(table.columns) == ["sample_id", *CLASS_NAMES]
    assert sorted(table["sample_id"], key=int) == sorted(ids, key=int)
    values = table[list(CLASS_NAMES)].to_numpy()
    np.testing.assert_allclose(values.sum(axis=1), 1.0, atol=1e-9)
    assert (values[:, :2] == 0).all() and (values >= 0).all()


def test_fold_prediction_scores_as_validation_did(smoke_run, packed_sample, sample_root, tmp_path):
    table = predict([best(smoke_run)], packed_sample, "fold:0", workers=0)
    manifest = load_manifest(packed_sample)
    check_submission(table, [k for k, f in manifest.data["folds"].items() if f == 0])
    write_csv_atomic(tmp_path / "fold0.csv", table)
    with open(smoke_run / "metrics.csv", newline="") as f:
        val_kl = float(list(csv.DictReader(f))[-1]["val_kl"])
    kl = evaluate_csv(sample_root / "train_labels.csv", tmp_path / "fold0.csv")["kl"]
    assert kl == pytest.approx(val_kl, rel=1e-5)  # one score function, one prediction path


def test_test_split_tta_and_ensemble(smoke_run, packed_sample):
    ids = [k for s in load_manifest(packed_sample).shards("test") for k in s["keys"]]
    plain = predict([best(smoke_run)], packed_sample, "test", workers=0)
    tta = predict([best(smoke_run)], packed_sample, "test", tta=True, workers=0)
    check_submission(plain, ids)
    check_submission(tta, ids)
    assert not np.allclose(plain[list(CLASS_NAMES)], tta[list(CLASS_NAMES)])
    last = smoke_run / "checkpoints" / "last.pt"
    both = predict([best(smoke_run), last], packed_sample, "test", workers=0)
    alone = predict([last], packed_sample, "test", workers=0)
    np.testing.assert_allclose(both[list(CLASS_NAMES)], (plain[list(CLASS_NAMES)] + alone[list(CLASS_NAMES)]) / 2,
                               atol=1e-6)


def test_two_ranks_predict_each_tile_once(smoke_run, packed_sample, tmp_path):
    out = tmp_path / "two.csv"
    torchrun(["-m", "dist_lc", "predict", "--checkpoint", str(best(smoke_run)), "--shards", str(packed_sample),
              "--split", "train", "--out", str(out), "--workers", "1"])
    two = pd.read_csv(out, dtype={"sample_id": str})
    one = predict([best(smoke_run)], packed_sample, "train", workers=0)
    assert len(two) == 300 and two["sample_id"].is_unique
    merged = one.merge(two, on="sample_id", suffixes=("", "_2"))
    for c in CLASS_NAMES:
        np.testing.assert_allclose(merged[c], merged[f"{c}_2"], atol=2e-3)  # bf16 batches differ in size


def test_not_a_checkpoint(packed_sample, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    proc = dist_lc(["predict", "--checkpoint", str(bogus), "--shards", str(packed_sample), "--out",
                    str(tmp_path / "x.csv")])
    assert proc.returncode == 2 and "not a dist_lc checkpoint" in proc.stderr and not (tmp_path / "x.csv").exists()


def test_checkpoint_of_another_model_config(smoke_run, packed_sample, tmp_path):
    state = torch.load(best(smoke_run), weights_only=True)
    state["config"]["model"]["filters"] = 32
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(InputError, match="incompatible model config"):
        predict([other], packed_sample, "test", workers=0)


def test_shards_without_manifest_and_bad_split(smoke_run, packed_sample, tmp_path):
    with pytest.raises(InputError, match="no manifest"):
        predict([best(smoke_run)], tmp_path, "test")
    with pytest.raises(InputError, match="expected test, train or fold:K"):
        predict([best(smoke_run)], packed_sample, "fold:9")
