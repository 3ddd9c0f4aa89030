"""The main job a new user runs: `dist-lc demo` end to end, and its refusals."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from torchrun_util import dist_lc


@pytest.mark.slow
def test_demo_runs_end_to_end_and_learns(tmp_path):
    """Every step of the demo as a user runs it, on 6 epochs a fold instead of its 25 and 2 of its 3
    folds (a sixth of the time; it still learns by far more than the assertion asks)."""
    out = tmp_path / "demo"
    proc = dist_lc(["demo", "--out", str(out), "--set", "train.epochs=6", "--set", "cv.folds=[0,1]"], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "cv" / "report.json").read_text())
    assert len(report["folds"]) == 2
    assert report["oof_kl"] < 0.5 * report["baseline_kl"], report  # the model learned
    submission = pd.read_csv(out / "cv" / "submission.csv")
    assert len(submission) == 24 and abs(submission.iloc[:, 1:].sum(axis=1) - 1).max() < 1e-9
    assert "out-of-fold KL" in proc.stdout and "mean-distribution KL" in proc.stdout
    assert list((out / "cv" / "plots").glob("*.png"))


def test_demo_refuses_a_folder_holding_other_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    proc = dist_lc(["demo", "--out", str(out)], timeout=120)
    assert proc.returncode == 2 and "not an earlier demo" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]


@pytest.mark.parametrize("setting,says", [
    ("train.epoch=5", "unknown config key 'train.epoch'"),
    ("train.batch_size=3", "3 tiles cannot be split evenly over 2 ranks"),   # what only cv's checks see
    ("cv.folds=[5]", "fold 5 is not one of the demo's folds 0..2"),
    ("data.shards=/elsewhere", "--set data.shards: the demo sets it itself; give a challenge folder with --data"),
])
def test_demo_refuses_a_bad_setting_before_writing_anything(tmp_path, setting, says):
    proc = dist_lc(["demo", "--out", str(tmp_path / "o"), "--executor", "local", "--set", setting], timeout=120)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_demo_refuses_data_that_is_not_the_challenge_layout(tmp_path):
    (tmp_path / "data").mkdir()
    proc = dist_lc(["demo", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "data")], timeout=120)
    assert proc.returncode == 2 and "not a challenge folder" in proc.stderr
    assert not (tmp_path / "o").exists()
