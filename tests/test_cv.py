"""``dist-lc cv`` / ``dist-lc report``: CV jobs through submitit (local Slurm and local executor),
requeue and resume, failures, grids, and bad input refused before anything is submitted.

The jobs train a tiny U-Net for one epoch on 32-pixel crops of a 60-tile subset of the real sample
(5 folds of 12 tiles, 8 test tiles), so that the whole file runs in a few minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from slurm_util import require_slurm
from torchrun_util import REPO, dist_lc, env, fault

from dist_lc import calibration, cli
from dist_lc.cv import executors, fold, plan
from dist_lc.config import load_config
from dist_lc.cv.plan import build_points, parse_grid
from dist_lc.metrics import kl_score
from lc_common.tiles import CLASS_NAMES

CLASSES = list(CLASS_NAMES)
REPORT_KEYS = {"folds", "mean_kl", "std_kl", "oof_kl", "baseline_kl", "per_class", "baseline_per_class",
               "missing_folds", "submission", "plots", "complete", "calibration"}


def tiny(shards, *extra) -> list[str]:
    """The smoke recipe shrunk for tests: narrow U-Net, 32-px crops, 1 epoch, folds 0 and 1, 2 tasks per job."""
    sets = [f"data.shards={shards}", "data.crop=32", "data.workers=0", "data.shuffle_buffer=8",
            "model.filters=8", "model.upconv_filters=8", "train.epochs=1", "train.batch_size=8",
            "train.micro_batch_size=4", "train.precision=fp32", "train.plot_every=0",
            "launcher.tasks_per_node=2", "launcher.time_min=5", "cv.folds=[0,1]", *extra]
    return ["--config", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)]]


def run_cv(args: list[str], timeout: float = 300, extra_env=None) -> subprocess.CompletedProcess:
    proc = dist_lc(["cv", *args], timeout=timeout, extra_env=extra_env)
    print(proc.stderr[-3000:])
    return proc


def labels(sample_root) -> pd.DataFrame:
    return pd.read_csv(sample_root / "train_labels.csv", dtype={"sample_id": str}).set_index("sample_id")[CLASSES]


def check_cv_folder(cv_dir: Path, sample_root, shards: Path) -> dict:
    """Everything a 2-fold CV must leave, checked against the official labels (not the shards)."""
    report = json.loads((cv_dir / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert [f["fold"] for f in report["folds"]] == [0, 1] and report["complete"]
    assert all(f["best_epoch"] == 1 and f["epochs_done"] == 1 for f in report["folds"])
    scores = [f["best_val_kl"] for f in report["folds"]]
    assert report["mean_kl"] == pytest.approx(np.mean(scores))
    assert report["std_kl"] == pytest.approx(np.std(scores, ddof=1))
    truth = labels(sample_root)
    oof = pd.read_csv(cv_dir / "oof.csv", dtype={"sample_id": str}).set_index("sample_id")
    folds = json.loads((shards / "manifest.json").read_text())["folds"]
    assert len(oof) == 24 and {folds[i] for i in oof.index} == {0, 1}
    assert report["oof_kl"] == pytest.approx(kl_score(truth.loc[oof.index].to_numpy(), oof[CLASSES].to_numpy()))
    assert sum(report["per_class"].values()) == pytest.approx(report["oof_kl"])
    prior = {k: truth.loc[[i for i, f in folds.items() if f != k]].mean().to_numpy() for k in (0, 1)}
    base = np.stack([prior[folds[i]] for i in oof.index])
    assert report["baseline_kl"] == pytest.approx(kl_score(truth.loc[oof.index].to_numpy(), base))
    check_calibration(cv_dir, report, truth, oof, folds)
    sub = pd.read_csv(cv_dir / "submission.csv", dtype={"sample_id": str})
    assert list(sub.columns) == ["sample_id", *CLASSES] and len(sub) == 8
    np.testing.assert_allclose(sub[CLASSES].sum(axis=1), 1.0, atol=1e-9)
    for name in ("report.md", "plots/learning_curves.png", "plots/fold_scores.png", "plots/per_class.png"):
        assert (cv_dir / name).is_file(), name
    assert json.loads((cv_dir / "fold0" / plan.DONE).read_text())["world_size"] == 2
    return report


def check_calibration(cv_dir: Path, report: dict, truth, oof, folds) -> None:
    """The calibrated oof score is cross-fitted (each fold by a fit on the other) and decides the submission."""
    cal = report["calibration"]
    assert cal["enabled"]
    y, f = truth.loc[oof.index].to_numpy(), np.array([folds[i] for i in oof.index])
    crossed = calibration.cross_fitted(y, oof[CLASSES].to_numpy(), f)
    assert cal["oof_kl"] == pytest.approx(kl_score(y, crossed))
    written = pd.read_csv(cv_dir / "oof_calibrated.csv", dtype={"sample_id": str}).set_index("sample_id")
    np.testing.assert_allclose(written.loc[oof.index, CLASSES], crossed, atol=1e-9)
    check_correction_choice(cv_dir, report)


def check_correction_choice(cv_dir: Path, report: dict) -> None:
    """submission.csv carries the correction with the lowest cross-fitted out-of-fold KL (or none)."""
    options = {"none": report["oof_kl"], **{k: report[k]["oof_kl"] for k in ("calibration", "second_stage")
                                            if report[k].get("oof_kl") is not None}}
    chosen = report["submission"]["correction"]
    assert chosen == min(options, key=options.get)
    assert report["calibration"]["applied"] == (chosen == "calibration") == report["submission"]["calibrated"]
    assert report["second_stage"]["applied"] == (chosen == "second_stage")
    assert (cv_dir / "submission_uncalibrated.csv").exists() == (chosen != "none")


@pytest.fixture(scope="module")
def slurm_cv(tiny_shards, tmp_path_factory) -> Path:
    require_slurm()
    cv_dir = tmp_path_factory.mktemp("slurm-cv") / "cv"
    proc = run_cv([*tiny(tiny_shards), "--out", str(cv_dir), "--executor", "slurm"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cv_dir


@pytest.fixture(scope="module")
def local_cv(tiny_shards, tmp_path_factory) -> Path:
    """A 2-fold CV through the local executor; the modules its launcher held at the end kept beside it."""
    cv_dir = tmp_path_factory.mktemp("local-cv") / "cv"
    modules = cv_dir.parent / "launcher-modules.txt"
    launcher = ("import sys\nfrom dist_lc import cli\nstatus = cli.main(sys.argv[2:])\n"
                "open(sys.argv[1], 'w').write('\\n'.join(sorted(sys.modules)))\nsys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", launcher, str(modules), "cv",
                           *tiny(tiny_shards, "train.loggers=[tensorboard,mlflow]"), "--out", str(cv_dir),
                           "--executor", "local"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cv_dir


@pytest.mark.slurm
def test_two_fold_cv_through_slurm_with_two_tasks(slurm_cv, sample_root, tiny_shards):
    check_cv_folder(slurm_cv, sample_root, tiny_shards)
    records = json.loads((slurm_cv / "jobs.json").read_text())["jobs"]
    assert [(r["fold"], r["executor"]) for r in records] == [(0, "slurm"), (1, "slurm")]
    assert all(Path(r["stderr"]).is_file() for r in records)
    script = next((slurm_cv / "submitit").glob("launch0/*/*_submission.sh")).read_text()
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --ntasks-per-node=2" in script  # both folds at once


@pytest.mark.slurm
def test_submission_is_the_ensemble_of_the_folds_best_checkpoints(slurm_cv, tiny_shards):
    from dist_lc.predict import predict

    best = [slurm_cv / f"fold{k}" / "checkpoints" / "best.pt" for k in (0, 1)]
    expected = predict(best, tiny_shards, "test", workers=0).set_index("sample_id")
    report = json.loads((slurm_cv / "report.json").read_text())
    name = "submission_uncalibrated.csv" if report["calibration"]["applied"] else "submission.csv"
    ensemble = pd.read_csv(slurm_cv / name, dtype={"sample_id": str}).set_index("sample_id")
    np.testing.assert_allclose(ensemble.loc[expected.index, CLASSES], expected[CLASSES], atol=1e-6)
    if report["calibration"]["applied"]:   # submission.csv = the mean of the calibrated fold models
        cal = calibration.Calibration(**report["calibration"]["params"])
        singles = [predict([p], tiny_shards, "test", workers=0).set_index("sample_id").loc[expected.index, CLASSES]
                   for p in best]
        calibrated = sum(cal.apply(t.to_numpy()) for t in singles) / len(singles)
        sub = pd.read_csv(slurm_cv / "submission.csv", dtype={"sample_id": str}).set_index("sample_id")
        np.testing.assert_allclose(sub.loc[expected.index, CLASSES], calibrated, atol=1e-6)


def test_local_executor_gives_the_same_report(local_cv, sample_root, tiny_shards):
    check_cv_folder(local_cv, sample_root, tiny_shards)
    # the launcher (often on a login node) neither starts nor reports with torch: its jobs do
    modules = (local_cv.parent / "launcher-modules.txt").read_text().split()
    assert "submitit" in modules and "matplotlib" in modules and "torch" not in modules
    records = json.loads((local_cv / "jobs.json").read_text())["jobs"]
    assert {r["executor"] for r in records} == {"local"}
    assert " submitit local: 2 rank(s) on cpu" in (local_cv / "fold0" / "train.log").read_text()


def test_the_out_of_fold_table_is_what_the_best_checkpoint_predicts(local_cv, tiny_shards):
    """A fold job takes its best validation's predictions as oof.csv rather than predicting again."""
    from dist_lc.predict import predict

    for k in (0, 1):
        run_dir = local_cv / f"fold{k}"
        done = json.loads((run_dir / plan.DONE).read_text())
        assert done["oof_from"] == f"validation of epoch {done['best_epoch']}"
        table, matrix = predict([run_dir / "checkpoints" / "best.pt"], tiny_shards, f"fold:{k}", workers=0,
                                with_confusion=True)
        written = pd.read_csv(run_dir / plan.OOF, dtype={"sample_id": str}).set_index("sample_id")
        again = table.set_index("sample_id").loc[written.index]
        np.testing.assert_allclose(written[CLASSES], again[CLASSES], atol=1e-5)
        confusion = np.array(json.loads((run_dir / plan.CONFUSION).read_text())["matrix"])
        assert confusion.sum() == matrix.sum() and np.abs(confusion - matrix).sum() <= 1e-3 * matrix.sum()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to run 2 jobs side by side")
def test_concurrent_local_jobs_each_run_on_their_own_cores(tiny_shards, tmp_path):
    """Two single-rank folds at once: each sizes its threads for its share, not for the whole machine."""
    cv_dir = tmp_path / "cv"
    proc = run_cv([*tiny(tiny_shards, "launcher.tasks_per_node=1", "launcher.max_parallel=2"),
                   "--out", str(cv_dir), "--executor", "local"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads((cv_dir / f"fold{k}" / plan.DONE).read_text()) for k in (0, 1)]
    assert [d["threads"] for d in done] == [len(os.sched_getaffinity(0)) // 2] * 2


@pytest.mark.slurm
def test_slurm_and_local_reports_have_the_same_structure(slurm_cv, local_cv):
    a, b = (json.loads((d / "report.json").read_text()) for d in (slurm_cv, local_cv))
    assert set(a) == set(b)
    assert set(a["folds"][0]) == set(b["folds"][0])
    plots = [sorted(p.name for p in (d / "plots").iterdir()) for d in (slurm_cv, local_cv)]
    assert plots[0] == plots[1]


def test_the_folds_of_a_cv_are_one_mlflow_experiment_named_after_its_folder(local_cv):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=(local_cv / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(local_cv.name)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["fold0", "fold1"]
    assert {r.data.params["data.fold"] for r in runs} == {"0", "1"}


def test_report_rebuilds_from_the_folder_alone(local_cv, capsys):
    before = json.loads((local_cv / "report.json").read_text())
    assert cli.main(["report", str(local_cv)]) == 0
    after = json.loads((local_cv / "report.json").read_text())
    assert after["oof_kl"] == before["oof_kl"] and after["folds"] == before["folds"]
    assert "oof KL" in capsys.readouterr().out


def test_the_second_stage_is_cross_fitted_and_chosen_only_when_it_scores_lowest(local_cv, sample_root, monkeypatch):
    """24 out-of-fold tiles are too few for the second stage by default; allowed here, it is fitted on one
    fold's tiles and scored on the other's, and the submission takes whichever correction scores lowest."""
    from dist_lc import second_stage

    assert json.loads((local_cv / "report.json").read_text())["second_stage"]["applied"] is False
    monkeypatch.setattr(second_stage, "MIN_TILES", 10)
    monkeypatch.setitem(second_stage.PARAMS, "min_data_in_leaf", 3)
    assert cli.main(["report", str(local_cv)]) == 0
    report = json.loads((local_cv / "report.json").read_text())
    stage = report["second_stage"]
    crossed = pd.read_csv(local_cv / "oof_second_stage.csv", dtype={"sample_id": str}).set_index("sample_id")
    truth = labels(sample_root).loc[crossed.index]
    assert stage["oof_kl"] == pytest.approx(kl_score(truth.to_numpy(), crossed[CLASSES].to_numpy()))
    features = pd.read_csv(local_cv / "tile_features.csv", dtype={"sample_id": str})
    assert len(features) == 68 and features.shape[1] == 1 + 34   # 60 train + 8 test tiles
    check_correction_choice(local_cv, report)


def test_a_fold_job_killed_from_outside_is_submitted_once_more(tiny_shards, tmp_path):
    """The first rank to reach step 2 is SIGKILLed, its job's only task (no result pickle, no note, the
    run folder's lock gone with it): its fold is submitted once more and the CV completes."""
    cv_dir = tmp_path / "cv"
    args = [*tiny(tiny_shards, "launcher.tasks_per_node=1", "launcher.max_parallel=2"), "--out", str(cv_dir)]
    proc = run_cv(args, extra_env=fault(f"kill step=2 marker={tmp_path / 'killed'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("was lost (process exited, without done.json or an error); submitting it once more") == 1
    assert len(json.loads((cv_dir / "jobs.json").read_text())["jobs"]) == 3
    assert json.loads((cv_dir / "report.json").read_text())["complete"]


def test_failed_fold_is_reported_then_resume_reruns_only_it(tiny_shards, tmp_path):
    """The first rank to reach step 2 raises: cv reports the other fold and exits 1; --resume reruns
    only the failed one."""
    cv_dir = tmp_path / "cv"
    args = [*tiny(tiny_shards, "launcher.tasks_per_node=1", "launcher.max_parallel=2"), "--out", str(cv_dir)]
    proc = run_cv(args, extra_env=fault(f"raise step=2 marker={tmp_path / 'raised'}"))
    assert proc.returncode == 1
    report = json.loads((cv_dir / "report.json").read_text())
    assert len(report["folds"]) == 1 and len(report["missing_folds"]) == 1 and not report["complete"]
    failed = report["missing_folds"][0]
    assert f"fold{failed} FAILED" in proc.stderr and f"fold{failed} failed" in proc.stderr
    log = proc.stderr.split(f"fold{failed} FAILED")[1].split("log: ")[1].split()[0]
    assert Path(log).is_file()

    proc = run_cv(["--out", str(cv_dir), "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 job(s) to run" in proc.stderr
    records = json.loads((cv_dir / "jobs.json").read_text())["jobs"]
    assert sorted(r["fold"] for r in records) == sorted([0, 1, failed])
    report = json.loads((cv_dir / "report.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1] and report["complete"]


@pytest.mark.slurm
def test_submitit_job_stopped_by_usr2_requeues_itself_and_resumes(tiny_shards, tmp_path):
    """USR2 (Slurm's signal before the time limit) → ranks stop at a step → checkpoint() → requeue → resume."""
    require_slurm()
    cv_dir, epochs = tmp_path / "cv", 8
    args = [*tiny(tiny_shards, f"train.epochs={epochs}", "cv.folds=[0]"), "--out", str(cv_dir), "--executor", "slurm"]
    proc = subprocess.Popen([sys.executable, "-m", "dist_lc", "cv", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        last = cv_dir / "fold0" / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 120
        while not last.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no last.pt"
            time.sleep(0.2)
        job_id = json.loads((cv_dir / "jobs.json").read_text())["jobs"][0]["job_id"]
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    log = (cv_dir / "fold0" / "train.log").read_text()
    assert "stop requested during epoch" in log and "resuming after epoch" in log
    metrics = pd.read_csv(cv_dir / "fold0" / "metrics.csv")
    assert list(metrics["epoch"]) == list(range(1, epochs + 1))
    stderr = Path(json.loads((cv_dir / "jobs.json").read_text())["jobs"][0]["stderr"]).read_text()
    assert "checkpoint: " in stderr and "stopped by SIGUSR2" in stderr


def test_signal_log_sees_signals_whatever_handler_is_installed():
    """What lets a job tell submitit's USR2 from Slurm's SIGTERM although train() owns both handlers."""
    import signal

    before = signal.getsignal(signal.SIGUSR2)
    try:
        with fold.SignalLog() as log:
            signal.signal(signal.SIGUSR2, lambda *_: None)  # as train() does
            os.kill(os.getpid(), signal.SIGUSR2)
        assert signal.SIGUSR2 in log.received and signal.SIGTERM not in log.received
    finally:
        signal.signal(signal.SIGUSR2, before)


# ----------------------------------------------------------------------------- the report's stages, on their own

def test_the_choice_of_correction_returns_its_decision_and_leaves_its_inputs_alone():
    from dist_lc.cv.report import correct

    calib = {"enabled": True, "applied": False, "oof_kl": 0.20, "params": {"scale": 1.0, "bias": [0.0] * 8}}
    stage = {"enabled": True, "applied": False, "reason": "needs at least 2 finished folds"}
    before = json.dumps([calib, stage])
    chosen = correct.choose(0.30, {"calibration": calib["oof_kl"], "second_stage": stage.get("oof_kl")})
    assert chosen == "calibration"
    assert correct.decided(calib, "calibration", chosen)["applied"] is True
    assert correct.decided(stage, "second_stage", chosen) == stage
    assert json.dumps([calib, stage]) == before
    assert correct.choose(0.10, {"calibration": 0.20, "second_stage": None}) == "none"
    assert "calibration scores lower" in correct.decided({"oof_kl": 0.5}, "second_stage", "calibration")["reason"]


def test_the_report_summary_names_scores_corrections_and_files():
    from dist_lc.cv import report

    r = {"cv_dir": "/x/cv", "name": "", "folds": [{"fold": 0, "best_epoch": 3, "best_val_kl": 0.5}],
         "mean_kl": 0.5, "std_kl": 0.0, "oof_kl": 0.4, "baseline_kl": None, "missing_folds": [1],
         "calibration": {"oof_kl": 0.3, "applied": True}, "second_stage": {"enabled": False}}
    text = report.summary(r)
    assert "| 0 | 3 | 0.5000 |" in text and "out-of-fold KL          0.4000" in text
    assert "calibrated            0.3000   (cross-fitted over folds; applied to submission.csv)" in text
    assert "mean-distribution KL    –" in text and "second stage" not in text and "unfinished folds" in text
    assert "fold runs   /x/cv/fold<k>/" in text


# ----------------------------------------------------------------------------- grids and bad input

def test_grid_is_the_cartesian_product_each_point_validated(tiny_shards):
    grid = parse_grid(["optim.lr=0.001,0.0003", "model.filters=16,32"])
    points = build_points("configs/smoke.yaml", [f"data.shards={tiny_shards}"], grid)
    assert [p.params for p in points] == [{"optim.lr": lr, "model.filters": f}
                                          for lr in (0.001, 0.0003) for f in (16, 32)]
    assert len({p.name for p in points}) == 4
    assert [(p.config["optim"]["lr"], p.config["model"]["filters"]) for p in points] == \
        [(0.001, 16), (0.001, 32), (0.0003, 16), (0.0003, 32)]


def cv_error(argv: list[str], capsys) -> str:
    assert cli.main(["cv", *argv]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("extra,message", [
    (["--grid", "optim.lr=0.001,0.01", "--grid", "model.filterz=8,16"],
     "--grid model.filterz=8,16: unknown config key 'model.filterz'"),
    (["--grid", "optim.lr=0.001,fast"], "--grid optim.lr=0.001,fast: config key 'optim.lr': expected a number"),
    (["--grid", "launcher.nodes=1,2"], "--grid launcher.nodes: cannot vary within a CV"),
    (["--set", "cv.folds=[0,7]"], "config key 'cv.folds': fold 7 is not in"),
    (["--set", "launcher.time_min=2"], "launcher.time_min=2 leaves no time before the stop signal"),
    (["--set", "launcher.tasks_per_node=3"], "8 tiles cannot be split evenly over 3 ranks"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tiny_shards, tmp_path, capsys, extra, message):
    line = cv_error([*tiny(tiny_shards), "--out", str(tmp_path / "cv"), *extra], capsys)
    assert line.startswith("error: ") and message in line
    assert not (tmp_path / "cv").exists()


@pytest.mark.parametrize("how", ["no scontrol on PATH", "bad SLURM_CONF"])
def test_unreachable_slurm_is_refused_before_submitting(tiny_shards, tmp_path, capsys, monkeypatch, how):
    if how == "no scontrol on PATH":
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    elif not executors.shutil.which("scontrol"):
        pytest.skip("scontrol not installed")
    else:  # a readable config whose controller does not exist: scontrol ping says DOWN at once
        conf = tmp_path / "slurm.conf"
        conf.write_text("ClusterName=nowhere\nSlurmctldHost=nohost(127.0.0.2)\nSlurmctldPort=6999\n")
        monkeypatch.setenv("SLURM_CONF", str(conf))
    line = cv_error([*tiny(tiny_shards), "--out", str(tmp_path / "cv"), "--executor", "slurm"], capsys)
    assert line.startswith("error: --executor slurm: ") and "nothing submitted" in line
    assert ("not on PATH" if how == "no scontrol on PATH" else "not reachable") in line
    assert not (tmp_path / "cv").exists()


def test_output_folder_rules(tiny_shards, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not an empty folder nor a CV folder" in cv_error([*tiny(tiny_shards), "--out", str(other)], capsys)
    assert "not a CV folder" in cv_error(["--out", str(other), "--resume"], capsys)
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    (cv_dir / "cv.json").write_text("{}")
    assert "already a CV folder; add --resume" in cv_error([*tiny(tiny_shards), "--out", str(cv_dir)], capsys)
    assert "unreadable CV plan" in cv_error(["--out", str(cv_dir), "--resume"], capsys)
    assert list(other.iterdir()) == [other / "notes.txt"]


def test_resume_refuses_a_new_config(local_cv, capsys):
    resume = ["--out", str(local_cv), "--resume"]
    assert "drop --config/--grid" in cv_error([*resume, "--config", "configs/smoke.yaml"], capsys)
    assert "only launcher.* keys" in cv_error([*resume, "--set", "optim.lr=1"], capsys)


def test_launcher_section_becomes_slurm_parameters(tmp_path):
    if not executors.shutil.which("srun"):
        pytest.skip("submitit's Slurm executor needs srun on PATH")
    cfg = load_config("configs/cv5.yaml", ["launcher.partition=gpu", "launcher.account=proj",
                                           "launcher.setup=[module load cuda]", "launcher.slurm_extra={qos: high}",
                                           "launcher.max_parallel=2"])
    params = executors.SlurmExecutor(cfg.launcher, tmp_path, jobs=5).engine.parameters
    assert params["partition"] == "gpu" and params["account"] == "proj" and params["gpus_per_node"] == 4
    assert params["ntasks_per_node"] == 4 and params["cpus_per_task"] == 8 and params["time"] == 240
    assert params["additional_parameters"] == {"qos": "high"} and params["setup"] == ["module load cuda"]
    assert params["array_parallelism"] == 2 and params["mem"] == "65536MB" and params["signal_delay_s"] == 120
    # srun of Slurm 22.05 to 23.02 does not take sbatch's --cpus-per-task: each rank would get one core
    assert params["srun_args"] == ["--kill-on-bad-exit=1", "--cpus-per-task=8"]


def test_a_plan_names_its_shards_by_absolute_path(tiny_shards, tmp_path, monkeypatch):
    """A shard folder given relative to the launch's folder is kept absolute in cv.json: the jobs, a
    --resume and `dist-lc report` may run elsewhere. URLs stay as they are."""
    monkeypatch.chdir(tiny_shards.parent)
    point, = build_points(str(REPO / "configs/smoke.yaml"), ["data.shards=shards"], {})
    assert point.config["data"]["shards"] == str(tiny_shards)
    point, = build_points(str(REPO / "configs/smoke.yaml"), ["data.shards=https://example.org/shards"], {})
    assert point.config["data"]["shards"] == "https://example.org/shards"


def test_array_tasks_share_one_plan_on_a_filesystem_without_locks(tiny_shards, tmp_path, monkeypatch):
    """slurm/cv_array.sbatch's tasks write cv.json once under a lock of their own (not the launcher's,
    which a watching `dist-lc cv --resume` holds); where flock is not supported (Lustre without
    locks: ENOSYS) they go on unserialised instead of failing."""
    import errno
    import fcntl

    def no_locks(*_):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cv_dir = tmp_path / "cv"
    sets = [f"data.shards={tiny_shards}"]
    first = plan.prepare_array(REPO / "configs/smoke.yaml", sets, cv_dir)
    again = plan.prepare_array(REPO / "configs/smoke.yaml", sets, cv_dir)
    assert first.folds == again.folds == [0, 1, 2, 3, 4] and (cv_dir / "cv.json").exists()
    assert sorted(p.name for p in cv_dir.iterdir()) == [".array.lock", "cv.json"]
