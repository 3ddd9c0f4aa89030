"""``dist-lc eval``: scoring a prediction CSV against the ground truth, and refusing bad files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dist_lc.evaluate import evaluate_csv, run
from lc_common.errors import InputError

NAMES = ["no_data", "clouds", "artificial", "cultivated", "broadleaf",
         "coniferous", "herbaceous", "natural", "snow", "water"]


def reference_kl(t: np.ndarray, p: np.ndarray) -> float:
    """Independent float64 challenge score on 10-column arrays."""
    t = t[:, 2:] / t[:, 2:].sum(axis=1, keepdims=True) + 1e-7
    p = p[:, 2:] / p[:, 2:].sum(axis=1, keepdims=True) + 1e-7
    return float(np.mean(np.sum(t * np.log(t / p), axis=1)))


def write(path, ids, values, columns=None):
    df = pd.DataFrame(values, columns=columns or NAMES)
    df.insert(0, "sample_id", ids)
    df.to_csv(path, index=False)
    return path


@pytest.fixture
def pair(tmp_path):
    """A small ground truth and a prediction for the same ids, in another order."""
    rng = np.random.default_rng(0)
    t = rng.random((6, 10))
    t[:, :2] = 0
    t /= t.sum(axis=1, keepdims=True)
    p = rng.random((6, 10))
    p /= p.sum(axis=1, keepdims=True)
    ids = [10, 11, 12, 20, 21, 30]
    gt = write(tmp_path / "gt.csv", ids, t)
    order = [3, 0, 5, 1, 4, 2]
    pred = write(tmp_path / "pred.csv", [ids[i] for i in order], p[order])
    return gt, pred, t, p


def test_score_is_matched_by_id(pair):
    gt, pred, t, p = pair
    result = evaluate_csv(gt, pred)
    assert result["n"] == 6
    assert result["kl"] == pytest.approx(reference_kl(t, p), rel=1e-12)
    assert list(result["per_class"]) == NAMES[2:]
    assert sum(result["per_class"].values()) == pytest.approx(result["kl"], rel=1e-12)


def test_run_prints_table_and_writes_json(pair, tmp_path, capsys):
    gt, pred, _, _ = pair
    out = tmp_path / "score.json"
    assert run(argparse.Namespace(gt=str(gt), pred=str(pred), out=str(out))) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["kl"] == pytest.approx(evaluate_csv(gt, pred)["kl"], rel=1e-15) and saved["n"] == 6
    assert f"{saved['kl']:.6f}" in printed
    rows = [line for line in printed.splitlines() if line.split()[:1] and line.split()[0] in NAMES]
    assert len(rows) == 8
    assert len({line.index(line.split()[1]) + len(line.split()[1]) for line in rows}) == 1  # right-aligned
    assert not list(tmp_path.glob(".score.json.*"))  # no temporary file left behind


def test_run_without_out_writes_nothing(pair, tmp_path, capsys):
    gt, pred, _, _ = pair
    assert run(argparse.Namespace(gt=gt, pred=pred)) == 0
    assert "KL divergence" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt.csv", "pred.csv"]


def test_run_refuses_out_in_missing_folder(pair, tmp_path):
    gt, pred, _, _ = pair
    with pytest.raises(InputError, match="does not exist"):
        run(argparse.Namespace(gt=gt, pred=pred, out=str(tmp_path / "nope" / "s.json")))


# ---------------------------------------------------------------- bad inputs

def test_missing_file(pair, tmp_path):
    gt, _, _, _ = pair
    with pytest.raises(InputError, match=r"missing\.csv: file does not exist"):
        evaluate_csv(gt, tmp_path / "missing.csv")


def test_not_a_csv(pair, tmp_path):
    gt, _, _, _ = pair
    binary = tmp_path / "image.tif"
    binary.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))
    with pytest.raises(InputError, match=r"image\.tif: not a CSV"):
        evaluate_csv(gt, binary)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match=r"empty\.csv: not a CSV"):
        evaluate_csv(gt, tmp_path / "empty.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=r"other\.csv: not a proportions CSV"):
        evaluate_csv(gt, tmp_path / "other.csv")
    with pytest.raises(InputError, match="not a file"):
        evaluate_csv(gt, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/mem").is_file(), reason="needs Linux's /proc/self/mem")
def test_an_unreadable_file_is_one_line(pair):
    """/proc/self/mem is a file whose reading from offset 0 fails with an I/O error."""
    gt, _, _, _ = pair
    with pytest.raises(InputError, match=r"^/proc/self/mem: cannot read \(Input/output error\)$"):
        evaluate_csv(gt, "/proc/self/mem")


def test_missing_columns_are_named(pair, tmp_path):
    gt, _, t, _ = pair
    bad = write(tmp_path / "bad.csv", [10, 11, 12, 20, 21, 30], np.delete(t, [3, 9], axis=1),
                [n for i, n in enumerate(NAMES) if i not in (3, 9)])
    with pytest.raises(InputError, match=r"bad\.csv: missing column\(s\) cultivated, water"):
        evaluate_csv(gt, bad)
    no_id = tmp_path / "no_id.csv"
    pd.DataFrame(t, columns=NAMES).to_csv(no_id, index=False)
    with pytest.raises(InputError, match="missing column.*sample_id"):
        evaluate_csv(no_id, gt)


def test_duplicate_ids(pair, tmp_path):
    gt, _, t, _ = pair
    dup = write(tmp_path / "dup.csv", [10, 11, 12, 20, 21, 20], t)
    with pytest.raises(InputError, match=r"dup\.csv: duplicate sample_id\(s\) 20"):
        evaluate_csv(gt, dup)
    with pytest.raises(InputError, match="dup.csv: duplicate"):
        evaluate_csv(dup, write(tmp_path / "two.csv", [10, 20], t[:2]))
    assert evaluate_csv(dup, write(tmp_path / "ok.csv", [10, 11], t[:2]))["n"] == 2   # not predicted: unused


def test_prediction_ids_missing_from_ground_truth(pair, tmp_path):
    gt, _, t, _ = pair
    extra = write(tmp_path / "extra.csv", [10, 11, 12, 20, 21, 30, 99, 98], np.vstack([t, t[:2]]))
    with pytest.raises(InputError, match=r"2 sample_id\(s\) not in the ground truth .*: 99, 98"):
        evaluate_csv(gt, extra)


def test_ground_truth_may_hold_more_ids_than_the_prediction(pair, tmp_path):
    """One fold's predictions score against the whole train_labels.csv: only predicted ids count."""
    gt, _, t, _ = pair
    short = write(tmp_path / "short.csv", [10, 11, 12, 20], t[:4])
    result = evaluate_csv(gt, short)
    assert result["n"] == 4 and abs(result["kl"]) < 1e-12


def test_zero_scored_row_is_named(pair, tmp_path):
    gt, _, t, _ = pair
    p = t.copy()
    p[4] = [0.5, 0.5] + [0.0] * 8
    zero = write(tmp_path / "zero.csv", [10, 11, 12, 20, 21, 30], p)
    with pytest.raises(InputError, match=r"zero\.csv: row sums to 0 over the scored classes for sample_id 21"):
        evaluate_csv(gt, zero)


@pytest.mark.parametrize("value, message", [(np.nan, "missing, non-numeric"), (-0.1, "negative"),
                                            ("abc", "non-numeric"), (np.inf, "infinite")])
def test_bad_values_name_the_id(pair, tmp_path, value, message):
    gt, _, t, _ = pair
    df = pd.DataFrame(t, columns=NAMES).astype(object)
    df.insert(0, "sample_id", [10, 11, 12, 20, 21, 30])
    df.loc[2, "broadleaf"] = value
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(InputError, match=rf"bad\.csv: .*{message}.*") as err:
        evaluate_csv(gt, tmp_path / "bad.csv")
    assert "12" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- the real labels

def test_real_labels_against_themselves_score_zero(sample_root):
    labels = sample_root / "train_labels.csv"
    result = evaluate_csv(labels, labels)
    assert abs(result["kl"]) < 1e-12
    assert all(abs(v) < 1e-12 for v in result["per_class"].values())
    assert result["n"] == len(pd.read_csv(labels))


def test_real_labels_against_the_mean_distribution(sample_root, tmp_path):
    labels = sample_root / "train_labels.csv"
    truth = pd.read_csv(labels)
    values = truth[NAMES].to_numpy(dtype=np.float64)
    mean = np.tile(values.mean(axis=0), (len(truth), 1))
    pred = write(tmp_path / "mean.csv", truth["sample_id"].to_numpy()[::-1], mean)  # reversed order
    result = evaluate_csv(labels, pred)
    assert result["n"] == len(truth)
    assert result["kl"] == pytest.approx(reference_kl(values, mean), rel=1e-9)
    assert 0.1 < result["kl"] < 10


# ---------------------------------------------------------------- as the challenge's own eval.py reads files

def test_prediction_may_leave_out_no_data_and_clouds_and_carry_extra_columns(pair, tmp_path):
    gt, _, t, p = pair
    eight = write(tmp_path / "eight.csv", [10, 11, 12, 20, 21, 30], p[:, 2:], NAMES[2:])
    extra = pd.read_csv(eight)
    extra["model"] = "unet"
    extra.to_csv(tmp_path / "extra.csv", index=False)
    for path in (eight, tmp_path / "extra.csv"):
        assert evaluate_csv(gt, path)["kl"] == pytest.approx(reference_kl(t, p), rel=1e-12)


def test_the_first_column_is_the_id_whatever_its_name_and_rows_need_not_sum_to_one(pair, tmp_path):
    gt, _, t, p = pair
    renamed = pd.DataFrame(p * 7.0, columns=NAMES)   # unnormalised: the score renormalises
    renamed.insert(0, "id", [10, 11, 12, 20, 21, 30])
    renamed.to_csv(tmp_path / "renamed.csv", index=False)
    assert evaluate_csv(gt, tmp_path / "renamed.csv")["kl"] == pytest.approx(reference_kl(t, p), rel=1e-12)


def test_an_empty_prediction_is_refused(pair, tmp_path):
    gt, _, _, _ = pair
    (tmp_path / "header.csv").write_text(",".join(["sample_id", *NAMES]) + "\n")
    with pytest.raises(InputError, match=r"header\.csv: no prediction rows"):
        evaluate_csv(gt, tmp_path / "header.csv")


def test_a_ground_truth_row_without_scored_classes_counts_only_when_predicted(pair, tmp_path):
    gt, _, t, p = pair
    t2 = t.copy()
    t2[5] = [1.0] + [0.0] * 9                            # tile 30: all no_data
    cloudy = write(tmp_path / "cloudy.csv", [10, 11, 12, 20, 21, 30], t2)
    assert evaluate_csv(cloudy, write(tmp_path / "p5.csv", [10, 11, 12, 20, 21], p[:5]))["n"] == 5
    with pytest.raises(InputError, match=r"cloudy\.csv: row sums to 0 over the scored classes for sample_id 30"):
        evaluate_csv(cloudy, write(tmp_path / "p6.csv", [10, 11, 12, 20, 21, 30], p))


def test_header_names_are_not_trimmed_and_the_line_says_so(pair, tmp_path):
    gt, _, t, p = pair
    spaced = write(tmp_path / "spaced.csv", [10, 11, 12, 20, 21, 30], p, [f" {n}" if n == "water" else n for n in NAMES])
    with pytest.raises(InputError, match=r"missing column\(s\) water \(column ' water' has spaces"):
        evaluate_csv(gt, spaced)


def test_a_ground_truth_with_columns_that_are_not_classes_is_refused(pair, tmp_path):
    gt, _, t, _ = pair
    df = pd.read_csv(gt)
    df["fold"] = 0
    df.to_csv(tmp_path / "gt_fold.csv", index=False)
    with pytest.raises(InputError, match="'fold' are not classes of the challenge"):
        evaluate_csv(tmp_path / "gt_fold.csv", gt)


def test_the_report_s_reader_keeps_ids_as_written_and_refuses_an_empty_one(tmp_path):
    """The CV report reads its folds' CSVs with these checks, ids as text (the shards' keys)."""
    from dist_lc.evaluate import read_predictions

    rows = np.full((2, 10), 0.1)
    table = read_predictions(write(tmp_path / "p.csv", ["007", "10"], rows), NAMES, text_ids=True)
    assert list(table.index) == ["007", "10"] and table.index.name == "sample_id"
    (tmp_path / "q.csv").write_text("sample_id," + ",".join(NAMES) + "\n," + ",".join(["0.1"] * 10) + "\n")
    with pytest.raises(InputError, match="q.csv: empty sample_id on data row"):
        read_predictions(tmp_path / "q.csv", NAMES, text_ids=True)


def test_the_table_explains_a_negative_contribution():
    from dist_lc.evaluate import format_report

    shown = format_report({"kl": 0.1, "n": 3, "per_class": {"water": 0.12, "snow": -0.02}})
    assert shown.splitlines()[-1].startswith("(negative: where present")
    assert "negative" not in format_report({"kl": 0.1, "n": 3, "per_class": {"water": 0.1, "snow": 0.0}})
