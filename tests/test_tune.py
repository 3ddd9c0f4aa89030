"""``dist-lc tune``: the space file checked before anything runs, the scores a trial reports, the
report of a study, and real studies of fold jobs: pruning through the local executor, one study on
the local Slurm, a launcher stopped (SIGTERM) and killed (SIGKILL) then resumed.

The studies train the tiny U-Net of tests/test_cv.py (1 epoch, 32-px crops, 12-tile folds) with
one learning rate that learns and one that does not, so that the pruner has clear cases.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_cv
from slurm_util import require_slurm, scancel
from torchrun_util import REPO, dist_lc, env

from dist_lc import cli
from dist_lc.config import load_config, to_dict
from dist_lc.tune import progress, report, space
from dist_lc.tune.settings import Settings, trial_plan
from lc_common.errors import InputError

GOOD_LR, BAD_LR = 0.01, 1.0e-9      # one epoch: val KL about 0.54 against 1.09 (the untrained net)
STOP_BOUND_S = 25


def write_space(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tune(args: list[str], timeout: float = 300, tag: str = "") -> subprocess.CompletedProcess:
    proc = dist_lc(["tune", *args], timeout=timeout, extra_env={"DIST_LC_TEST_TAG": tag} if tag else None)
    print(proc.stderr[-4000:])
    return proc


def study_args(shards: Path, out: Path, space_file: Path, *extra: str, sets=()) -> list[str]:
    """A study of the tiny recipe: single-rank fold jobs, folds 0 and 1."""
    recipe = test_cv.tiny(shards, "launcher.tasks_per_node=1", "train.loggers=[]", *sets)
    return [*recipe, "--space", str(space_file), "--out", str(out), *extra]


def lr_space(tmp_path: Path) -> Path:
    return write_space(tmp_path / "lr.yaml", f"optim.lr: [{GOOD_LR}, {BAD_LR}]\n")   # 1e-09: read as text


def read_report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def submissions(out: Path, number: int) -> list[dict]:
    path = out / "trials" / str(number) / "jobs.json"
    return json.loads(path.read_text())["jobs"] if path.exists() else []


def tagged(tag: str) -> list[int]:
    """Live processes started with DIST_LC_TEST_TAG=tag (the launcher, job controllers, tasks)."""
    needle, pids = f"DIST_LC_TEST_TAG={tag}\0".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (proc / "environ").read_bytes() and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def gone(tag: str, within_s: float = 15) -> bool:
    """Whether every process started with the tag has ended within ``within_s`` (a job whose
    done.json is written still takes a moment to exit)."""
    deadline = time.monotonic() + within_s
    while tagged(tag):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def end_tagged(tag: str) -> None:
    """What a failed test left of the processes it started: killed, by pid."""
    for pid in tagged(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def check_report(out: Path, trials: int) -> dict:
    """What every finished study leaves: a report whose objective is the folds' mean, a loadable best.yaml."""
    rep = read_report(out)
    assert [t["number"] for t in rep["trials"]] == list(range(trials))   # none lost, none twice
    for t in rep["trials"]:
        if t["state"] == "COMPLETE":
            kls = [json.loads((out / "trials" / str(t["number"]) / f"fold{k}" / "done.json").read_text())["best_val_kl"]
                   for k in (0, 1) if (out / "trials" / str(t["number"]) / f"fold{k}").exists()]
            assert t["value"] == pytest.approx(sum(kls) / len(kls)) and t["folds_done"] == len(kls)
    best = min((t for t in rep["trials"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
    assert rep["best"]["number"] == best["number"]
    cfg = load_config(out / "best.yaml")   # a recipe `dist-lc cv --config` accepts
    assert cfg.optim.lr == pytest.approx(best["params"]["optim.lr"])
    text = (out / "report.md").read_text()
    assert "## Trials" in text and "## Parameter importance" in text and f"Trial {best['number']}:" in text
    assert all((out / p).is_file() for p in rep["plots"]) and rep["plots"]
    return rep


# ----------------------------------------------------------------------------- the space file

SMOKE = ["--config", "configs/smoke.yaml"]


@pytest.mark.parametrize("text,problem", [
    ("optim.lrr: {float: [1.0e-4, 1.0e-2]}\n", "optim.lrr: unknown config key (did you mean 'optim.lr'?)"),
    ("optim.name: [adam, adamx]\n", "optim.name: 'adamx' is not a declared choice (adam, adamw, rmsprop, adagrad, sgd)"),
    ("optim.lr: {float: [0.0, 1.0e-2]}\n", "optim.lr: bounds [0.0, 0.01] lie outside the key's declared range"),
    ("model.num_layers: {int: [1, 9]}\n", "model.num_layers: bounds [1, 9] lie outside the key's declared range (0 to 6)"),
    ("model.filters: {float: [8, 32]}\n", "model.filters: a float distribution on an integer key: use int"),
    ("optim.lr: {int: [1, 2]}\n", "optim.lr: an int distribution on a float key"),
    ("optim.name: {float: [1, 2]}\n", "optim.name: a float distribution on a key that is not a number"),
    ("optim.lr: {float: [1.0e-4, 1.0e-2\n", "invalid YAML: line 2"),
    ("optim.lr: {float: [1.0e-2, 1.0e-4]}\n", "optim.lr: low 0.01 must be below high 0.0001"),
    ("optim.weight_decay: {float: [0.0, 0.1], log: true}\n", "optim.weight_decay: a log distribution needs low > 0"),
    ("optim.lr: {float: [1.0e-4, 1.0e-2], lgo: true}\n", "optim.lr: unknown option 'lgo' of a float distribution "
     "(did you mean 'log'?)"),
    ("model.filters: {int: [8, 30], step: 8}\n", "model.filters: high - low (22) is not a multiple of step 8"),
    ("data.crop: {int: [32, 64], step: 4}\n", "data.crop: 36 is refused by the config: 36 must be divisible by 8"),
    ("data.crop: {int: [32, 64], log: true}\n", "data.crop: 33 is refused by the config: 33 must be divisible by 8"),
    ("launcher.nodes: {int: [1, 2]}\n", "launcher.nodes: cannot vary between trials"),
    ("data.fold: [0, 1]\n", "data.fold: cannot vary between trials"),
    ("optim: {float: [1, 2]}\n", "optim: is a section of the config, not a key"),
    ("optim.lr: 0.01\n", "optim.lr: expected a distribution"),
    ("optim.lr: []\n", "optim.lr: a categorical distribution is a non-empty list of values"),
    ("", "a space file maps config keys to distributions"),
    (None, "space file does not exist"),
])
def test_a_bad_space_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, text, problem):
    space_file = tmp_path / "space.yaml"
    if text is not None:
        space_file.write_text(text)
    out = tmp_path / "tune"
    assert cli.main(["tune", *SMOKE, "--space", str(space_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {space_file}: ") and problem in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("argv,problem", [
    (["--sampler", "cmaes"], "--sampler cmaes searches numeric spaces only; optim.name is categorical"),
    (["--resume"], "not a tune folder"),
    (["--resume", "--sampler", "random"], "--resume continues the study as it was set up: drop --sampler"),
])
def test_a_sampler_that_does_not_fit_and_a_resume_of_nothing_are_refused(tmp_path, capsys, argv, problem):
    space_file = write_space(tmp_path / "space.yaml", "optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"
                                                     "optim.name: [adam, adamw]\n")
    out = tmp_path / "tune"
    resume = "--resume" in argv
    base = ["--out", str(out)] if resume else [*SMOKE, "--space", str(space_file), "--out", str(out)]
    assert cli.main(["tune", *base, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("content,problem", [
    ("{", "unreadable tune settings (JSONDecodeError"),
    ("null", "unreadable tune settings (ValueError: not a JSON object but NoneType)"),
    ('{"format": "dist_lc.tune/0"}', "unreadable tune settings (ValueError: format is not dist_lc.tune/1)"),
    ('{"format": "dist_lc.tune/1"}', "unreadable tune settings (TypeError"),
    ("OTHER_VERSION", "written by another version of dist_lc (unknown config key 'model.depth'"),
    ("OTHER_SAMPLER", "written by another version of dist_lc (sampler 'gp' is not one of tpe, random, qmc, cmaes)"),
])
def test_a_resume_of_a_damaged_tune_folder_names_its_settings_file(tmp_path, capsys, content, problem):
    out = tmp_path / "tune"
    config, sampler = ({}, "gp") if content == "OTHER_SAMPLER" else ({"model": {"depth": 3}}, "tpe")
    settings = Settings(out, config, {}, [0], "local", sampler, 0, "median", 0, 0, "sequential", 2, 1, 1)
    out.mkdir()
    settings.save()
    if not content.startswith("OTHER_"):
        (out / "tune.json").write_text(content)
    assert cli.main(["tune", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'tune.json'}: ") and problem in err[0], err


def test_the_shipped_space_fits_the_recommended_recipe_and_a_trial_becomes_overrides(tmp_path):
    base = to_dict(load_config("configs/recommended.yaml"))
    searched = space.load_space("configs/spaces/recommended.yaml", base)
    assert {"optim.lr", "optim.name", "model.filters"} <= set(searched.keys) and not searched.numeric
    assert space.space_from_dict(searched.to_dict()).to_dict() == searched.to_dict()   # what tune.json keeps
    tiny = space.load_space(write_space(tmp_path / "lr.yaml", "optim.lr: [0.01, 1e-9]\n"), base)
    assert tiny.param("optim.lr").choices == (0.01, 1e-9)   # YAML reads 1e-9 as text; it means the number
    params = {"optim.lr": 1.0e-05, "optim.name": "rmsprop", "model.filters": 24, "loss.kl_weight": 0.0}
    assert space.overrides(params) == ['optim.lr=1e-05', 'optim.name="rmsprop"', "model.filters=24",
                                       "loss.kl_weight=0.0"]
    config = space.trial_config(base, params)
    assert (config["optim"]["lr"], config["optim"]["name"], config["model"]["filters"]) == (1.0e-05, "rmsprop", 24)
    assert base["optim"]["name"] == "adamw"   # the base is left as it was


@pytest.mark.parametrize("extra,epochs,warmup", [((), 60, 15), (("--pruner-warmup", "0"), 60, 0), ((), 3, 0)])
def test_a_trial_is_not_pruned_before_a_quarter_of_a_folds_epochs_unless_told(tiny_shards, tmp_path, extra, epochs,
                                                                               warmup):
    from dist_lc.tune import launch

    parser, _ = cli.build_parser()
    args = parser.parse_args(["tune", *study_args(tiny_shards, tmp_path / "study", lr_space(tmp_path), "--executor",
                                                  "local", *extra, sets=[f"train.epochs={epochs}"])])
    settings = launch.new_settings(args)
    assert (settings.steps_per_fold, settings.pruner_warmup) == (epochs, warmup)


@pytest.mark.parametrize("extra, warned", [((), True), (("--pruner-warmup", "2"), False), (("--pruner", "none"), False)])
def test_a_time_limited_study_with_the_default_warm_up_is_warned_about(tiny_shards, tmp_path, capsys, extra, warned):
    """train.epochs high and a time limit deciding: a quarter of train.epochs is never reached, and
    no fold would be cut midway without a word."""
    from dist_lc.tune import launch

    parser, _ = cli.build_parser()
    args = parser.parse_args(["tune", *study_args(tiny_shards, tmp_path / "study", lr_space(tmp_path), "--executor",
                                                  "local", *extra, sets=["train.epochs=1000", "train.time_limit=1"])])
    launch.new_settings(args)
    assert ("default warm-up of 250 epochs" in capsys.readouterr().err) is warned


# ----------------------------------------------------------------------------- what a trial reports

def fold(k: int, curve, seen: int, best: float | None = None) -> progress.FoldScores:
    return progress.FoldScores(k, list(curve), seen, None if best is None else {"best_val_kl": best})


def test_sequential_folds_report_one_block_of_steps_per_fold():
    """Fold 0 finished (validated epochs 1 and 3 of 3), fold 1 at its epoch 1; fold 2 not started."""
    folds = [fold(0, [(1, 0.9), (3, 0.5)], 3, best=0.5), fold(1, [(1, 0.7)], 1), fold(2, [], 0)]
    steps = progress.intermediate(folds, "sequential", 3)
    assert steps == {0: 0.9, 2: 0.5, 3: pytest.approx((0.5 + 0.7) / 2)}


def test_no_folds_first_epochs_are_reported_within_the_warm_up_but_each_folds_end_is():
    """Warm-up 2 of 4 epochs: fold 1's first epochs would otherwise be judged (the pruner's own
    warm-up counts steps from the first fold's start)."""
    folds = [fold(0, [(1, 0.9), (2, 0.8), (3, 0.6), (4, 0.5)], 4, best=0.5), fold(1, [(1, 0.9), (2, 0.7), (3, 0.4)], 3)]
    assert progress.intermediate(folds, "sequential", 4, warmup=2) == {2: 0.6, 3: 0.5, 6: pytest.approx(0.45)}
    folds = [fold(0, [(1, 0.9)], 1, best=0.9), fold(1, [], 0)]   # stopped early, inside the warm-up
    assert progress.intermediate(folds, "sequential", 4, warmup=2) == {2: 0.9, 3: 0.9}   # its best, past the warm-up


def test_a_fold_that_stopped_early_reports_its_best_at_the_end_of_its_block():
    folds = [fold(0, [(1, 0.9), (2, 0.6)], 2, best=0.6), fold(1, [], 0)]
    assert progress.intermediate(folds, "sequential", 4) == {0: 0.9, 1: 0.6, 2: 0.6, 3: 0.6}   # no gap


def test_parallel_folds_report_an_epoch_once_every_fold_has_passed_it():
    folds = [fold(0, [(1, 0.8), (2, 0.6)], 2), fold(1, [(1, 0.4)], 1)]
    assert progress.intermediate(folds, "parallel", 3) == {0: pytest.approx(0.6)}
    folds[1] = fold(1, [(1, 0.4), (2, 0.5)], 2)   # no better at epoch 2: its best so far stays 0.4
    assert progress.intermediate(folds, "parallel", 3) == {0: pytest.approx(0.6), 1: pytest.approx(0.5)}
    folds = [fold(0, [(1, 0.8)], 1, best=0.8), fold(1, [(1, 0.4), (3, 0.2)], 3, best=0.2)]  # fold 0 stopped early
    assert progress.intermediate(folds, "parallel", 3)[2] == pytest.approx(0.5)


def test_the_median_pruner_judges_a_trial_by_its_value_now_not_by_its_first_folds_best():
    """Sequential folds: a trial's value rises when its next fold starts (the finished folds' mean
    with the running fold's best). Fold 0 went better than the others', fold 1 far worse than any
    complete trial's: pruned, where Optuna's rule (the trial's best value ever: its first fold's)
    keeps it."""
    import optuna

    from dist_lc.tune.study import MedianNowPruner

    others = [{0: 0.60, 1: 0.50, 2: 0.45 + d, 3: 0.44 + d} for d in (0.0, 0.01, 0.02)]   # 2 folds of 2 steps
    late = {0: 0.50, 1: 0.40, 2: 0.80}   # fold 0 better than the others', fold 1 far worse
    verdicts = {}
    for pruner in (optuna.pruners.MedianPruner(n_startup_trials=1), MedianNowPruner(n_startup_trials=1)):
        study = optuna.create_study(pruner=pruner)
        for values in others:
            study.add_trial(optuna.trial.create_trial(value=values[3], intermediate_values=values))
        trial = study.ask()
        for step, value in late.items():
            trial.report(value, step)
        verdicts[type(pruner).__name__] = trial.should_prune()
    assert verdicts == {"MedianPruner": False, "MedianNowPruner": True}
    study = optuna.create_study(pruner=MedianNowPruner(n_startup_trials=1))   # as good as the median now: kept
    for values in others:
        study.add_trial(optuna.trial.create_trial(value=values[3], intermediate_values=values))
    trial = study.ask()
    for step, value in {0: 0.7, 1: 0.6, 2: 0.45}.items():
        trial.report(value, step)
    assert not trial.should_prune()


def test_a_fold_is_read_from_its_metrics_and_done_json(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train_loss,val_kl\n1,6,2.1,0.9\n2,12,1.9,\n3,18,1.5,0.95\n"
                                          "4,24,1.2,0.7\n")
    scores = progress.read_fold(tmp_path, 3)
    assert scores.curve == [(1, 0.9), (3, 0.9), (4, 0.7)] and scores.epochs_seen == 4 and scores.best is None
    (tmp_path / "done.json").write_text(json.dumps({"best_val_kl": 0.7}))
    assert progress.read_fold(tmp_path, 3).best == 0.7


# ----------------------------------------------------------------------------- the report, from a folder alone

def synthetic_study(out: Path, results: dict[int, list[float] | str]) -> None:
    """A tune folder written as a launcher would: settings, the study's journal, each trial's CV folder
    with its folds' done.json (a str: the trial's final state without folds)."""
    from optuna.trial import TrialState

    from dist_lc.tune.study import open_study

    config = to_dict(load_config("configs/smoke.yaml"))
    searched = write_space(out.parent / "space.yaml", "optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"
                                                      "optim.name: [adam, adamw]\n")
    settings = Settings(out=out, config=config, space=space.load_space(searched, config).to_dict(), folds=[0, 1],
                        executor="local", sampler="random", seed=0, pruner="median", pruner_startup=1,
                        pruner_warmup=0, fold_order="sequential", trials=len(results), parallel=1, steps_per_fold=2,
                        recipe="configs/smoke.yaml", space_file=str(searched))
    out.mkdir()
    settings.save()
    study = open_study(settings)
    for number, kls in results.items():
        trial = study.ask(settings.search_space.distributions())
        plan = trial_plan(settings, trial.number, trial.params)
        if isinstance(kls, str):
            trial.report(1.5, 0)
            study.tell(trial, state=TrialState[kls])
            continue
        for k, kl in enumerate(kls):
            run_dir = plan.run_dir(plan.points[0], k)
            run_dir.mkdir(parents=True)
            (run_dir / "done.json").write_text(json.dumps({"best_val_kl": kl, "best_epoch": 2}))
            trial.report(sum(kls[:k + 1]) / (k + 1), 2 * k + 1)
        study.tell(trial, sum(kls) / len(kls))


def test_the_report_ranks_trials_measures_the_gap_in_fold_noise_and_writes_a_loadable_best_recipe(tmp_path, capsys):
    out = tmp_path / "tune"
    synthetic_study(out, {0: [0.50, 0.60], 1: [0.40, 0.44], 2: "PRUNED", 3: [0.45, 0.47], 4: "FAIL"})
    assert cli.main(["tune", "--report", str(out)]) == 0
    printed = capsys.readouterr().out
    rep = read_report(out)
    assert rep["states"] == {"COMPLETE": 3, "PRUNED": 1, "FAIL": 1}
    assert rep["best"]["number"] == 1 and rep["best"]["kl_mean"] == pytest.approx(0.42)
    assert rep["best"]["kl_std"] == pytest.approx(0.0282843, rel=1e-4)   # sample std of 0.40, 0.44
    gap = rep["gap"]   # 0.46 - 0.42 = 0.04; the best's standard error 0.0283/√2 = 0.02
    assert gap["second"] == 3 and gap["difference"] == pytest.approx(0.04)
    assert gap["se_best"] == pytest.approx(0.02) and gap["in_se_best"] == pytest.approx(2.0)
    # fold by fold: 0.45 - 0.40, 0.47 - 0.44; their std 0.0141 / √2 = 0.01
    assert (gap["folds_paired"], gap["better_on"]) == (2, 2) and gap["z"] == pytest.approx(4.0)
    assert rep["importance"] == {"reason": "needs at least 10 completed trials (3 so far)"}
    assert rep["trials"][2]["state"] == "PRUNED" and rep["trials"][2]["value"] == 1.5
    cfg = load_config(out / "best.yaml")
    assert cfg.optim.lr == pytest.approx(rep["best"]["params"]["optim.lr"])
    assert cfg.optim.name == rep["best"]["params"]["optim.name"]
    text = (out / "report.md").read_text()
    assert "Trial 1: mean validation KL **0.4200**" in text and "2.0 × its fold noise" in text
    assert ("fold by fold, better on 2 of the 2 folds both ran, the mean difference 4.0 standard errors of the "
            "per-fold differences." in text)
    assert "| 2 | pruned |" in text and "| 4 | fail |" in text and "Not computed: needs at least 10" in text
    assert "best trial 1: KL 0.4200" in printed
    assert (out / "plots" / "history.png").stat().st_size > 1000


def test_two_trials_whose_every_fold_differs_alike_are_told_apart_fold_by_fold(tmp_path):
    """Folds 0.30 / 0.50 against 0.33 / 0.52: the best wins on both, by 0.03 and 0.02; the two trials'
    standard errors (the folds' own spread, 0.1 and 0.095) would call them alike (z 0.18)."""
    out = tmp_path / "tune"
    synthetic_study(out, {0: [0.30, 0.50], 1: [0.33, 0.52]})
    gap = report.build(out)["gap"]
    assert (gap["best"], gap["folds_paired"], gap["better_on"]) == (0, 2, 2)
    assert gap["z"] == pytest.approx(0.025 / 0.005) and gap["in_se_best"] == pytest.approx(0.025 / 0.1)
    text = (out / "report.md").read_text()
    assert "better on 2 of the 2 folds both ran, the mean difference 5.0 standard errors" in text
    assert "do not tell the two apart" not in text


@pytest.mark.parametrize("extra", [["--trials", "3"], ["--set", "launcher.max_parallel=2"], ["--pruner", "none"]])
def test_report_refuses_options_it_would_ignore(tmp_path, capsys, extra):
    out = tmp_path / "tune"
    synthetic_study(out, {0: [0.5, 0.6]})
    assert cli.main(["tune", "--report", str(out), *extra]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --report DIR rebuilds the report from DIR alone: drop "
                                               f"{extra[0]}")


def test_importances_come_with_enough_trials_and_a_study_without_a_complete_trial_still_reports(tmp_path):
    out = tmp_path / "tune"
    synthetic_study(out, {k: [0.3 + 0.05 * k, 0.32 + 0.05 * k] for k in range(10)})
    rep = report.build(out)
    assert set(rep["importance"]["values"]) == {"optim.lr", "optim.name"} and rep["importance"]["top"] == 0.5
    assert "among the best 50% of the completed ones" in (out / "report.md").read_text()
    empty = tmp_path / "empty" / "tune"
    empty.parent.mkdir()
    synthetic_study(empty, {0: "FAIL"})
    rep = report.build(empty)
    assert rep["best"] is None and not (empty / "best.yaml").exists()
    assert "No trial completed yet." in (empty / "report.md").read_text()


def test_a_best_trial_whose_folds_scored_the_same_has_no_fold_noise_and_still_reports(tmp_path, capsys):
    out = tmp_path / "tune"
    synthetic_study(out, {0: [0.40, 0.40], 1: [0.50, 0.60]})
    assert cli.main(["tune", "--report", str(out)]) == 0
    gap = read_report(out)["gap"]
    assert gap["se_best"] == 0 and gap["in_se_best"] is None
    assert gap["reason"] == "its folds scored the same: no fold noise to compare with"
    assert "below the second best (trial 1) (its folds scored the same" in (out / "report.md").read_text()


def test_a_trial_whose_cv_folder_cannot_be_read_is_reported_as_such_beside_the_others(tmp_path):
    out = tmp_path / "tune"
    synthetic_study(out, {0: [0.50, 0.60], 1: [0.40, 0.44]})
    (out / "trials" / "0" / "cv.json").write_text("{")   # damaged: the other trials are still reported
    rep = report.build(out)
    assert rep["trials"][0]["unreadable"].startswith(str(out / "trials" / "0" / "cv.json"))
    assert rep["best"]["number"] == 1


def test_the_best_recipe_runs_the_recipes_folds_not_the_ones_the_search_ran_on(tiny_shards, tmp_path):
    """--folds 0 narrows the recipe's cv.folds [0, 1]; `dist-lc cv --config best.yaml` runs them all."""
    import yaml

    from dist_lc.tune import launch
    from dist_lc.tune.study import open_study

    parser, _ = cli.build_parser()
    args = parser.parse_args(["tune", *study_args(tiny_shards, tmp_path / "study", lr_space(tmp_path), "--executor",
                                                  "local", "--folds", "0", "--parallel", "1")])
    settings = launch.new_settings(args)
    assert settings.folds == [0] and settings.config["cv"]["folds"] == [0]
    settings.out.mkdir()
    settings.save()
    study = open_study(launch.load_settings(settings.out))
    trial = study.ask(settings.search_space.distributions())
    plan = trial_plan(settings, trial.number, trial.params)
    run_dir = plan.run_dir(plan.points[0], 0)
    run_dir.mkdir(parents=True)
    (run_dir / "done.json").write_text(json.dumps({"best_val_kl": 0.5, "best_epoch": 1}))
    study.tell(trial, 0.5)
    report.build(settings.out)
    text = (settings.out / "best.yaml").read_text()
    assert yaml.safe_load(text)["cv"]["folds"] == [0, 1] and load_config(settings.out / "best.yaml").cv.folds == [0, 1]
    assert "cv.folds is the recipe's (0, 1), not the search's (0)" in text


# ----------------------------------------------------------------------------- samplers, pruners, stop signals

@pytest.mark.parametrize("sampler", ["tpe", "random", "qmc", "cmaes"])
@pytest.mark.parametrize("pruner", ["median", "halving", "hyperband", "none"])
def test_every_sampler_and_pruner_runs_a_study_of_the_numeric_space(tmp_path, sampler, pruner, monkeypatch):
    """Trials asked, reported and judged as the scheduler does, with each sampler and each pruner."""
    import importlib.util

    from dist_lc.tune import study as study_mod

    if sampler == "cmaes" and importlib.util.find_spec("cmaes") is None:
        with pytest.raises(InputError, match=r"needs the cmaes package \(pip install cmaes\)"):
            study_mod.check_sampler("cmaes", space.space_from_dict({"optim.lr": {"float": [1e-4, 1e-2]}}))
        return
    config = to_dict(load_config("configs/smoke.yaml"))
    searched = space.load_space(write_space(tmp_path / "s.yaml", "optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"
                                            "model.filters: {int: [8, 32], step: 8}\n"), config)
    study_mod.check_sampler(sampler, searched)
    settings = Settings(out=tmp_path, config=config, space=searched.to_dict(), folds=[0], executor="local",
                        sampler=sampler, seed=0, pruner=pruner, pruner_startup=1, pruner_warmup=0,
                        fold_order="sequential", trials=5, parallel=1, steps_per_fold=2)
    study = study_mod.open_study(settings)
    for number in range(5):
        trial = study.ask(searched.distributions())
        assert 1e-4 <= trial.params["optim.lr"] <= 1e-2 and trial.params["model.filters"] in (8, 16, 24, 32)
        trial.report(1.0 + number, 0)   # each trial worse than the ones before
        trial.should_prune()
        study.tell(trial, 1.0 + number)
    assert len(study.trials) == 5 and study.best_trial.number == 0


def test_the_options_offer_the_declared_executors_and_the_implemented_samplers_and_pruners():
    import argparse

    from dist_lc.config import LauncherConfig, choices
    from dist_lc.tune import study as study_mod

    parser, modules = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["tune"]
    offered = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert offered["executor"] == choices(LauncherConfig, "executor") and modules["tune"] == "dist_lc.tune.launch"
    assert set(offered["sampler"]) == set(study_mod.SAMPLER_TABLE)
    assert set(offered["pruner"]) == set(study_mod.PRUNER_TABLE)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
def test_a_stop_signal_ends_the_launcher_with_128_plus_its_number_and_one_line(tmp_path, capsys, monkeypatch, sig):
    from dist_lc.tune import launch, scheduler

    out = tmp_path / "tune"
    synthetic_study(out, {0: [0.5, 0.6]})

    def stopped(self):
        os.kill(os.getpid(), sig)
        time.sleep(5)   # the handler raises before this ends
        raise AssertionError("no stop")

    monkeypatch.setattr(scheduler.Scheduler, "run", stopped)
    before = signal.getsignal(sig)
    assert launch.study_run(launch.load_settings(out), resumed=True) == 128 + sig
    assert signal.getsignal(sig) is before   # the launcher's handlers are gone with it
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"tune: stopped by {signal.Signals(sig).name}; no job was running: dist-lc tune --out {out} "
                    "--resume continues the study")


# ----------------------------------------------------------------------------- real studies

@pytest.mark.slow
def test_a_study_through_the_local_executor_prunes_the_rate_that_does_not_learn(tiny_shards, tmp_path):
    """Six trials, two jobs at once, folds one after another, the median pruner judging from the first
    completed trial: a trial with the rate that does not learn, judged once the trials before it have
    completed, is pruned at its first validated epoch; its jobs are cancelled."""
    out, tag = tmp_path / "tune", f"tune-local-{tmp_path.name}"
    try:
        proc = tune(study_args(tiny_shards, out, lr_space(tmp_path), "--trials", "6", "--parallel", "2",
                               "--executor", "local", "--pruner-startup", "1"), tag=tag)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rep = check_report(out, 6)
        pruned = [t for t in rep["trials"] if t["state"] == "PRUNED"]
        assert pruned and all(t["params"]["optim.lr"] == BAD_LR and t["folds_done"] < 2 for t in pruned)
        # trials 0 and 1 start together, so trial 0 may run both folds before one completes; the trials
        # after them start once one has completed
        late = [t for t in pruned if t["number"] >= 2]
        assert late and all(len(submissions(out, t["number"])) <= 1 for t in late)
        assert rep["best"]["params"]["optim.lr"] == GOOD_LR
        complete = [t for t in rep["trials"] if t["state"] == "COMPLETE"]
        assert all(set(t["intermediate"]) == {"0", "1"} for t in complete)   # one step per validated epoch
        running = [int(line.split(" job(s) running")[0].rsplit(" ", 1)[1])
                   for line in proc.stderr.splitlines() if " job(s) running" in line]
        assert running and max(running) <= 2
        assert f"trial {pruned[0]['number']} PRUNED" in proc.stderr
        assert "Traceback" not in proc.stderr   # cancelled jobs end quietly (their controllers are not interrupted)
        assert gone(tag)
        before = rep["best"]
        assert cli.main(["tune", "--report", str(out)]) == 0 and read_report(out)["best"] == before
    finally:
        end_tagged(tag)


@pytest.mark.slow
@pytest.mark.slurm
def test_a_study_through_slurm_with_parallel_folds(tiny_shards, tmp_path):
    require_slurm()
    out = tmp_path / "tune"
    try:
        proc = tune(study_args(tiny_shards, out, lr_space(tmp_path), "--trials", "2", "--parallel", "2",
                               "--executor", "slurm", "--fold-order", "parallel", "--sampler", "random",
                               "--pruner", "hyperband"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        rep = check_report(out, 2)
        for t in rep["trials"]:
            jobs = submissions(out, t["number"])
            assert {j["executor"] for j in jobs} == {"slurm"} and sorted(j["fold"] for j in jobs) == [0, 1]
    finally:
        for number in range(2):
            for job in submissions(out, number):
                scancel(job["job_id"])


def started(args: list[str], tag: str, log: Path) -> subprocess.Popen:
    """`dist-lc tune` in a session of its own (a signal reaches the launcher alone), output to a file."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "dist_lc", "tune", *args], cwd=REPO,
                                env=env(DIST_LC_TEST_TAG=tag), stdout=f, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"no {path}: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def trial_states(out: Path) -> dict[int, str]:
    from dist_lc.tune.study import load_trials

    return {t.number: t.state.name for t in load_trials(out)}


@pytest.mark.slow
def test_a_launcher_stopped_then_killed_resumes_without_losing_or_repeating_a_trial(tiny_shards, tmp_path):
    """SIGTERM as for `dist-lc cv` (local jobs ended, one line, 143); then a resumed launcher SIGKILLed
    once a fold of a running trial has finished; the next --resume continues that trial (its finished
    fold not run again) and ends with exactly the study's trials."""
    out, tag = tmp_path / "tune", f"tune-kill-{tmp_path.name}"
    log = tmp_path / "launcher.log"
    args = study_args(tiny_shards, out, lr_space(tmp_path), "--trials", "3", "--parallel", "2", "--executor",
                      "local", "--pruner", "none")
    try:
        proc = started(args, tag, log)
        wait_for(out / "trials" / "1" / "fold0" / "train.log", proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_BOUND_S) == 143, log.read_text()[-3000:]
        last = log.read_text().strip().splitlines()[-1]
        assert last.startswith("tune: stopped by SIGTERM; ") and "local job(s) ended" in last and "--resume" in last
        assert gone(tag, within_s=2) and "RUNNING" in trial_states(out).values()

        proc = started(["--out", str(out), "--resume"], tag, log)
        wait_for(out / "trials" / "0" / "fold0" / "done.json", proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        running = [n for n, s in trial_states(out).items() if s == "RUNNING"]
        assert 0 in running
        done_before = {(n, k): [j["fold"] for j in submissions(out, n)].count(k) for n in running for k in (0, 1)
                       if (out / "trials" / str(n) / f"fold{k}" / "done.json").exists()}
        assert (0, 0) in done_before

        again = tune(["--out", str(out), "--resume"], tag=tag)
        assert again.returncode == 0, again.stderr[-3000:]
        assert all(f"trial {n} continued" in again.stderr for n in running)
        states = trial_states(out)
        assert sorted(states) == [0, 1, 2] and set(states.values()) == {"COMPLETE"}
        for (n, k), count in done_before.items():   # a fold finished before the kill was not submitted again
            assert [j["fold"] for j in submissions(out, n)].count(k) == count
        check_report(out, 3)
        assert gone(tag)
    finally:
        end_tagged(tag)
