"""``dist-lc report`` on small synthetic CV folders: no training, no shards (the truth is handed to
stage 1 in place of the shards' proportions), so each test takes well under a second or two.

Damaged fold files are one line naming the file; the ranking of grid points, the choice of a
correction and its nested score; what the submission says it holds; report.json is strict JSON.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from dist_lc import cli
from dist_lc.config import load_config, to_dict
from dist_lc.cv.plan import Plan, Point
from dist_lc.cv.report import correct, figures, scores, tables, text
from lc_common.tiles import CLASS_NAMES

CLASSES = list(CLASS_NAMES)
PER_FOLD, TEST_IDS = 12, ["900", "901", "902", "903"]


def proportions(rng, n: int) -> np.ndarray:
    """(n, 10) proportions over the 8 scored classes (no_data and clouds 0)."""
    out = np.zeros((n, 10))
    out[:, 2:] = rng.dirichlet(np.full(8, 0.8), size=n)
    return out


def blurred(rng, truth: np.ndarray, noise: float = 0.5) -> np.ndarray:
    """A model's predictions: the truth with noise on its log-proportions, renormalised."""
    z = np.log(truth[:, 2:] + 1e-2) + rng.normal(0, noise, (len(truth), 8))
    out = np.zeros_like(truth)
    out[:, 2:] = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return out


def table(ids, values) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(ids, name="sample_id"), columns=CLASSES)


@pytest.fixture
def cv(tmp_path, monkeypatch):
    """A finished 3-fold CV folder of one point (12 tiles a fold, 4 test tiles; calibration on, second
    stage off), its truth handed to stage 1 in place of the shards'."""
    rng = np.random.default_rng(0)
    n = 3 * PER_FOLD
    ids = [str(100 + i) for i in range(n)]
    truth = table(ids, proportions(rng, n))
    truth.insert(0, "fold", np.repeat([0, 1, 2], PER_FOLD))
    monkeypatch.setattr(tables, "read_truth", lambda cv_dir, shards: truth)
    monkeypatch.setattr(tables, "read_shard_facts", lambda shards: tables.ShardFacts(set(TEST_IDS), 2))
    cv_dir = tmp_path / "cv"
    config = to_dict(load_config("configs/smoke.yaml", [f"data.shards={tmp_path / 'shards'}", "cv.folds=[0,1,2]",
                                                       "cv.second_stage=false"]))
    plan = Plan(cv_dir, [Point("", {}, config)], [0, 1, 2])
    cv_dir.mkdir()
    plan.save()
    pred = blurred(rng, truth[CLASSES].to_numpy())
    for k in range(3):
        run_dir = cv_dir / f"fold{k}"
        run_dir.mkdir()
        mine = truth["fold"].to_numpy() == k
        table(np.array(ids)[mine], pred[mine]).reset_index().to_csv(run_dir / "oof.csv", index=False)
        table(TEST_IDS, proportions(rng, len(TEST_IDS))).reset_index().to_csv(run_dir / "test.csv", index=False)
        (run_dir / "oof_confusion.json").write_text(json.dumps({"matrix": np.eye(8, dtype=int).tolist()}))
        (run_dir / "done.json").write_text(json.dumps(
            {"best_epoch": 3, "best_val_kl": 0.3 + 0.1 * k, "final_train_loss": 1.0, "epochs_done": 3, "epochs": 3,
             "train_s": 1.0, "predict_s": 1.0, "world_size": 1}))
    return cv_dir


def report_error(cv_dir, capsys) -> str:
    assert cli.main(["report", str(cv_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err   # one line, no traceback
    return err[0]


def edit_done(run_dir, **changes) -> None:
    done = json.loads((run_dir / "done.json").read_text())
    for key, value in changes.items():
        if value is ...:
            done.pop(key)
        else:
            done[key] = value
    (run_dir / "done.json").write_text(json.dumps(done))


def test_a_finished_folder_reports(cv):
    assert cli.main(["report", str(cv)]) == 0
    report = json.loads((cv / "report.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1, 2] and report["submission"]["folds"] == [0, 1, 2]
    assert report["fold_blocks"] == 2 and "folds [0, 1, 2] (blocks of 2 train tiles in id order)" in (cv / "report.md").read_text()
    assert "tile by tile" not in text.summary_line(report)
    for tiles in (None, 1):   # a pack made before blocks, or --block-size 1
        assert "; folds drawn tile by tile: optimistic (lc-shard pack --block-size above 1 holds out regions); " \
            in text.summary_line({**report, "fold_blocks": tiles})


def test_the_fold_table_says_which_folds_a_time_limit_or_early_stop_ended(cv):
    edit_done(cv / "fold0", stop_reason="time_limit")
    edit_done(cv / "fold1", stop_reason="early_stop")   # fold 2: a done.json of before it was recorded
    assert cli.main(["report", str(cv)]) == 0
    rows = [line for line in (cv / "report.md").read_text().splitlines() if line.startswith("| ") and "/3" in line]
    assert [r.split(" | ")[5] for r in rows] == ["3/3 (time limit)", "3/3 (early stop)", "3/3"], rows


# ----------------------------------------------------------------------------- damaged fold files

def _csv_lines(path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


DAMAGE = {
    "empty oof.csv": (lambda d: (d / "oof.csv").write_text(""), "fold1/oof.csv: not a CSV file"),
    "oof.csv without its header": (lambda d: _csv_lines(d / "oof.csv", lambda ls: ls[1:]),
                                   "fold1/oof.csv: not a proportions CSV"),
    "a class column missing": (lambda d: pd.read_csv(d / "oof.csv").drop(columns="water").to_csv(d / "oof.csv",
                                                                                                index=False),
                               "fold1/oof.csv: missing column(s) water"),
    "a non-numeric cell": (lambda d: _csv_lines(d / "oof.csv", lambda ls: [ls[0], ls[1].replace(",0.", ",x", 1),
                                                                          *ls[2:]]),
                           "fold1/oof.csv: sample_id 112: missing, non-numeric or infinite value"),
    "a short row": (lambda d: _csv_lines(d / "oof.csv", lambda ls: [ls[0], ls[1].rsplit(",", 2)[0], *ls[2:]]),
                    "fold1/oof.csv: sample_id 112: missing, non-numeric or infinite value in column snow"),
    "done.json without best_val_kl": (lambda d: edit_done(d, best_val_kl=...),
                                      "fold1/done.json: fold result without best_val_kl"),
    "done.json without best_epoch": (lambda d: edit_done(d, best_epoch=...),
                                     "fold1/done.json: fold result without best_epoch"),
    "a text train_s": (lambda d: edit_done(d, train_s="1 s"), "fold1/done.json: fold result's train_s is not a number"),
    "a confusion without its matrix": (lambda d: (d / "oof_confusion.json").write_text('{"classes": []}'),
                                       'fold1/oof_confusion.json: unreadable confusion matrix (no "matrix" in it)'),
    "a confusion of another shape": (lambda d: (d / "oof_confusion.json").write_text('{"matrix": [[1, 2], [3, 4]]}'),
                                     "fold1/oof_confusion.json: confusion matrix of shape (2, 2), expected (8, 8)"),
    "done.json but no oof.csv": (lambda d: (d / "oof.csv").unlink(), "fold1/oof.csv: file does not exist"),
    "out-of-fold ids not in the truth": (lambda d: _csv_lines(d / "oof.csv", lambda ls: [ls[0], "77" + ls[1][3:],
                                                                                       *ls[2:]]),
                                         "fold1/oof.csv: 1 sample_id(s) not among the train tiles of"),
    "another fold's tile": (lambda d: _csv_lines(d / "oof.csv", lambda ls: [ls[0], "100" + ls[1][3:], *ls[2:]]),
                            "fold1/oof.csv: 1 sample_id(s) of other folds than 1: 100"),
    "other test tiles": (lambda d: _csv_lines(d / "test.csv", lambda ls: ls[:-1]),
                         "fold1/test.csv: not the test tiles of"),
    "an oof.csv without some of its fold's tiles": (lambda d: _csv_lines(d / "oof.csv", lambda ls: ls[:3]),
                                                    "fold1/oof.csv: 10 of fold 1's 12 tiles not predicted: "),
    "a NaN time in the timeline": (lambda d: edit_done(d, timeline={"epochs_s": 10.0, "job_s": math.nan}),
                                   "fold1/done.json: fold result's timeline.job_s is not a finite number (NaN)"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_fold_file_is_one_line_naming_it(cv, capsys, damage):
    do, message = DAMAGE[damage]
    do(cv / "fold1")
    line = report_error(cv, capsys)
    assert line.startswith("error: ") and message in line, line
    assert not (cv / "report.json").exists()


def test_test_predictions_of_shards_packed_again_with_other_test_tiles_are_refused(cv, capsys):
    """Every fold predicted the same test tiles, but the shards' are others now: the submission
    would be of the old tiles (and the second stage would find no features for them)."""
    for k in range(3):
        _csv_lines(cv / f"fold{k}" / "test.csv", lambda ls: ls[:-1])
    line = report_error(cv, capsys)
    assert line == (f"error: {cv / 'fold0' / 'test.csv'}: not the test tiles of {cv.parent / 'shards'} (1 missing, "
                    "0 extra: 903); were the shards packed again since?")


# ----------------------------------------------------------------------------- the ranking of grid points

def block(name: str, kls: dict[int, float | None], planned=(0, 1, 2)) -> dict:
    """A grid point's block as the ranking reads it: its finished folds' best validation KL."""
    values = [math.nan if v is None else v for v in kls.values()]
    return {"name": name, "folds": [{"fold": k, "best_val_kl": v} for k, v in kls.items()],
            "missing_folds": [k for k in planned if k not in kls], "complete": set(kls) == set(planned),
            "mean_kl": float(np.mean(values)) if values else None}


def test_a_point_with_a_nan_score_is_never_the_best():
    blocks = [block("nan", {0: None, 1: 0.1, 2: 0.1}), block("good", {0: 0.5, 1: 0.5, 2: 0.5})]
    assert scores.best_point(blocks)["name"] == "good"
    assert [b["name"] for b in scores.rank(blocks).blocks] == ["good", "nan"]


def test_unfinished_points_are_compared_on_the_folds_they_share():
    """b's hard fold 2 has not finished: on its own mean it would beat a; on folds 0 and 1 it does not."""
    blocks = [block("a", {0: 0.30, 1: 0.30, 2: 0.90}, planned=(0, 1, 2, 3)),
              block("b", {0: 0.40, 1: 0.40}, planned=(0, 1, 2, 3)),
              block("none", {}, planned=(0, 1, 2, 3))]
    ranking = scores.rank(blocks)
    assert [b["name"] for b in ranking.blocks] == ["a", "b", "none"] and ranking.shared_folds == [0, 1]
    assert scores.best_point(blocks)["name"] == "a"


def test_complete_points_rank_first_and_the_table_names_the_best_point_first():
    blocks = [block("partial", {0: 0.1}), block("complete", {0: 0.5, 1: 0.5, 2: 0.5})]
    ranking = scores.rank(blocks)
    assert ranking.blocks[0] is scores.best_point(blocks) and ranking.blocks[0]["name"] == "complete"


def test_the_std_of_one_fold_is_none_not_zero(cv, monkeypatch):
    for k in (1, 2):
        (cv / f"fold{k}" / "done.json").unlink()
    assert cli.main(["report", str(cv)]) == 1   # a partial report
    report = json.loads((cv / "report.json").read_text())
    assert report["std_kl"] is None
    assert "± " not in text.summary_line(report) and "mean KL 0.3000 over 1 fold(s)" in text.summary_line(report)
    assert "no std from one fold" in (cv / "report.md").read_text()


# ----------------------------------------------------------------------------- the choice of a correction

def test_a_nan_score_takes_no_part_in_the_choice():
    assert correct.choose(math.nan, {"calibration": 0.2, "second_stage": None}) == "calibration"
    assert correct.choose(0.3, {"calibration": math.nan, "second_stage": 0.4}) == "none"


def test_a_correction_beaten_by_none_says_so():
    reason = correct.decided({"oof_kl": 0.5}, "calibration", "none")["reason"]
    assert reason == "not applied: the uncorrected predictions score lower than it cross-fitted"


def out_of_fold(folds: int, per_fold: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = folds * per_fold
    ids = [str(i) for i in range(n)]
    truth = table(ids, proportions(rng, n))
    truth.insert(0, "fold", np.repeat(np.arange(folds), per_fold))
    oof = correct.OutOfFold(table(ids, blurred(rng, truth[CLASSES].to_numpy())), truth[CLASSES].to_numpy(),
                            truth["fold"].to_numpy())
    return oof, truth


def test_the_nested_score_chooses_each_fold_s_correction_on_the_other_folds_alone():
    """Recomputed by hand: for each fold k, the calibration cross-fitted over the other folds against
    the uncorrected predictions there; the winner, fitted on the other folds, corrects fold k."""
    from dist_lc import calibration

    oof, truth = out_of_fold(4, 15)
    candidate = correct.calibration_candidate(True, oof, 4, truth)
    nested = correct.nested_choice(oof, truth, {"calibration": candidate})
    expected = oof.pred.copy()
    for k in range(4):
        inner = oof.folds != k
        crossed = calibration.cross_fitted(oof.truth[inner], oof.pred[inner], oof.folds[inner])
        chosen = correct.choose(scores.score(truth, oof.table[inner]).kl,
                                {"calibration": scores.score(truth, table(oof.table.index[inner], crossed)).kl})
        assert nested["choices"][str(k)] == chosen
        if chosen == "calibration":
            expected[~inner] = calibration.fit(oof.truth[inner], oof.pred[inner]).apply(oof.pred[~inner])
    assert nested["oof_kl"] == pytest.approx(scores.score(truth, table(oof.table.index, expected)).kl, rel=1e-9)


def test_with_two_folds_nothing_can_be_chosen_nested_and_the_uncorrected_score_stands():
    oof, truth = out_of_fold(2, 15)
    candidate = correct.calibration_candidate(True, oof, 2, truth)
    nested = correct.nested_choice(oof, truth, {"calibration": candidate})
    assert nested["choices"] == {"0": "none", "1": "none"}
    assert nested["oof_kl"] == pytest.approx(scores.score(truth, oof.table).kl)


def test_the_second_stage_counts_the_tiles_of_its_smallest_fit_not_all_out_of_fold_tiles():
    """60 out-of-fold tiles in 5 folds: each cross-fitted fit sees 48, under the 50 a fit needs."""
    from dist_lc import second_stage

    oof, truth = out_of_fold(5, 12)
    assert len(oof.table) >= second_stage.MIN_TILES > correct.smallest_fit(oof.folds) == 48

    def features():
        raise AssertionError("the tiles' features are read only for a second stage that is fitted")

    candidate = correct.second_stage_candidate(True, oof, 5, truth, features)
    assert candidate.crossed is None
    assert candidate.record["reason"].endswith("(has 5 folds, and 48 tiles in its smallest fit)")
    assert correct.smallest_fit(np.array([0, 0, 0, 1, 2])) == 2 and correct.smallest_fit(np.array([])) == 0


def test_the_report_gives_the_nested_score_and_says_what_the_choice_was_made_on(cv):
    assert cli.main(["report", str(cv)]) == 0
    report = json.loads((cv / "report.json").read_text())
    nested = report["choice_nested"]
    assert set(nested["choices"]) == {"0", "1", "2"} and nested["oof_kl"] > 0
    md = (cv / "report.md").read_text()
    assert "of the chosen correction, nested" in md and "the ones the choice for submission.csv was made on" in md
    assert "chosen, nested" in text.summary(report) and "chosen, nested" in text.summary_line(report)


# ----------------------------------------------------------------------------- the submission

def test_the_submission_lists_the_folds_it_averages(cv):
    (cv / "fold2" / "test.csv").unlink()
    assert cli.main(["report", str(cv)]) == 0
    report = json.loads((cv / "report.json").read_text())
    assert report["submission"]["folds"] == [0, 1]
    assert "finished folds [2] have no test.csv and are not in it" in (cv / "report.md").read_text()


def test_an_uncorrected_submission_leaves_no_earlier_corrected_one_beside_it(cv):
    """Neither the plain mean of an earlier report nor its cross-fitted corrected out-of-fold tables
    (of what may have been another best point) stay beside an uncorrected submission."""
    (cv / "submission_uncalibrated.csv").write_text("sample_id,no_data\n1,1\n")   # an earlier report's
    (cv / "oof_calibrated.csv").write_text("sample_id,no_data\n1,1\n")
    plan = json.loads((cv / "cv.json").read_text())
    plan["points"][0]["config"]["cv"]["calibrate"] = False
    (cv / "cv.json").write_text(json.dumps(plan))
    assert cli.main(["report", str(cv)]) == 0
    assert json.loads((cv / "report.json").read_text())["submission"]["correction"] == "none"
    assert not (cv / "submission_uncalibrated.csv").exists() and not (cv / "oof_calibrated.csv").exists()


def test_a_plot_that_fails_leaves_the_earlier_report_s_files_as_they_were(cv, capsys, monkeypatch):
    """A new submission or out-of-fold table beside the report.json of an earlier report would pass for
    what that report describes."""
    from lc_common.errors import WriteError

    assert cli.main(["report", str(cv)]) == 0
    (cv / "fold2" / "test.csv").unlink()   # the next report averages other folds
    before = {p.name: p.read_bytes() for p in cv.glob("*.*") if p.is_file()}

    def full(*args):
        raise WriteError(cv / "plots" / "folds.png", OSError(28, "No space left on device"))

    monkeypatch.setattr(figures, "draw", full)
    assert cli.main(["report", str(cv)]) != 0
    assert {p.name: p.read_bytes() for p in cv.glob("*.*") if p.is_file()} == before


def test_the_submission_line_names_the_correction_applied():
    sub = {"tiles": 4, "folds": [0, 1], "calibrated": False, "correction": "second_stage"}
    line = text._submission_lines(sub, [0, 1])[-1]
    assert "corrected by the second stage" in line and ", calibrated" not in line
    plain = text._submission_lines({**sub, "correction": "none"}, [0, 1])[-1]
    assert "submission_uncalibrated.csv" not in plain


# ----------------------------------------------------------------------------- strict JSON, plots

def test_a_nan_score_is_written_as_null(cv):
    (cv / "fold0" / "done.json").write_text((cv / "fold0" / "done.json").read_text()
                                            .replace('"best_val_kl": 0.3', '"best_val_kl": NaN'))
    assert cli.main(["report", str(cv)]) == 0

    def refuse(token):
        raise AssertionError(f"{token} in report.json")

    report = json.loads((cv / "report.json").read_text(), parse_constant=refuse)
    assert report["mean_kl"] is None and report["folds"][0]["best_val_kl"] is None


def test_the_per_class_plot_of_tiles_without_a_scored_class(tmp_path):
    empty = {"per_class": {}, "baseline_per_class": {}, "oof_kl": None, "baseline_kl": None}
    figures.plot_per_class(empty, tmp_path / "per_class.png")
    assert (tmp_path / "per_class.png").stat().st_size > 0


def test_a_cached_table_is_computed_again_for_shards_of_other_content(tmp_path):
    """truth.csv / tile_features.csv: shards packed again with other tiles, as many of them, must not
    reuse the table computed from the first ones."""
    from types import SimpleNamespace

    def table(value):
        return pd.DataFrame({"x": [value, value]}, index=pd.Index(["1", "2"], name="sample_id"))

    path = tmp_path / "truth.csv"
    first, other = SimpleNamespace(identity="a" * 64), SimpleNamespace(identity="b" * 64)
    assert tables._cached(path, first, 2, lambda: table(1.0))["x"].tolist() == [1.0, 1.0]
    assert tables._cached(path, first, 2, lambda: table(9.0))["x"].tolist() == [1.0, 1.0]   # the cache
    assert tables._cached(path, other, 2, lambda: table(2.0))["x"].tolist() == [2.0, 2.0]
