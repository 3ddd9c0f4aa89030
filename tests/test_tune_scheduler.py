"""``dist-lc tune``'s scheduler (and the cv launch it is made of) against an executor whose jobs are
records of this process: how a trial ends when its folds diverge, fail, finish, are lost or were never
fully drawn, and what the launcher then says and returns. No training runs.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from optuna.trial import TrialState

from dist_lc.config import load_config, to_dict
from dist_lc.cv import executors
from dist_lc.cv.executors import Executor, JobState
from dist_lc.cv.plan import Submission, now
from dist_lc.run_dir import record_failure
from dist_lc.train import Diverged, TrainingError
from dist_lc.tune import launch, space
from dist_lc.tune.settings import Settings, existing_plan
from dist_lc.tune.study import load_trials, open_study
from lc_common.errors import InputError

LR = "optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\n"


class RecordExecutor(Executor):
    """Each job ends at its second look: it writes metrics.csv and done.json, or a failure note of
    the kind ``outcome(trial number)`` says ("done", "diverged", "failed"); or it runs until cancelled
    ("runs")."""

    name = "local"
    poll_s = 0.01
    gone_grace_s = 0.005
    task_failed_grace_s = None
    outcome = staticmethod(lambda number: "done")
    lose = 0   # each fold's first `lose` jobs are lost: gone without a note or an error (a lost node)
    gone = ("gone",)   # what presence says of a gone job at its 2nd, 3rd, ... look (the last one repeats)
    _ids = itertools.count()

    def __init__(self, launcher, folder, jobs=1):
        super().__init__(launcher, folder, jobs)
        self.jobs: dict[str, dict] = {}
        self.cancelled: list[str] = []
        self.submitted: dict[Path, int] = {}

    def capacity(self) -> float:
        return self.launcher.max_parallel or 1

    def submit(self, work):
        out = []
        for item in work:
            job_id = f"record{next(self._ids)}"
            run_dir = Path(item.run_dir)
            self.submitted[run_dir] = self.submitted.get(run_dir, 0) + 1
            lost = self.submitted[run_dir] <= self.lose
            self.jobs[job_id] = {"run_dir": run_dir, "looks": 0,
                                 "outcome": "lost" if lost else type(self).outcome(trial_of(run_dir))}
            log = str(Path(item.run_dir) / "job.log")
            out.append((Submission(item.point, item.fold, self.name, job_id, log, log, now()), job_id))
        return out

    def refresh(self, records) -> None:
        pass

    def presence(self, record, handle=None):
        job = self.jobs[record.job_id]
        job["looks"] += 1
        if job["outcome"] == "runs":   # until it is cancelled
            return (None, "cancelled") if record.job_id in self.cancelled else (JobState.RUNNING, "")
        if job["looks"] == 2 and record.job_id not in self.cancelled:
            self._end(job)
        if job["looks"] < 2:
            return JobState.RUNNING, ""
        return None, self.gone[min(job["looks"] - 2, len(self.gone) - 1)]

    @staticmethod
    def _end(job: dict) -> None:
        run_dir = job["run_dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
        if job["outcome"] == "done":
            (run_dir / "metrics.csv").write_text("epoch,step,train_loss,val_kl\n1,1,1.0,0.6\n2,2,1.0,0.5\n")
            (run_dir / "done.json").write_text(json.dumps({"best_val_kl": 0.5, "best_epoch": 2}))
        elif job["outcome"] in ("vanished", "lost"):   # killed before it could leave a note
            pass
        elif job["outcome"] == "diverged":
            record_failure(run_dir, 0, Diverged("loss is not finite (NaN/inf) on 1 rank(s)"))
        else:
            record_failure(run_dir, 0, TrainingError("rank 0: out of cuda memory"))

    def first_failure(self, record):
        job = self.jobs[record.job_id]
        failed = job["looks"] >= 2 and job["outcome"] not in ("done", "lost")
        return ("TrainingError: it failed", record.stderr) if failed else None

    def cancel(self, record, handle=None) -> None:
        self.cancelled.append(record.job_id)

    def interrupt(self, jobs) -> str:
        for record, handle in jobs:
            self.cancel(record, handle)
        return f"{len(jobs)} job(s) ended"


def trial_of(run_dir: Path) -> int:
    """trials/N/foldK: N; a CV's fold folder: 0."""
    name = run_dir.parent.name
    return int(name) if name.isdigit() else 0


@pytest.fixture
def records(monkeypatch):
    class Records(RecordExecutor):   # what a test sets (outcome, lose) stays its own
        pass

    monkeypatch.setitem(executors.EXECUTORS, "local", Records)
    return Records


def settings_of(tmp_path: Path, text: str = LR, trials: int = 4, folds=(0,)) -> Settings:
    config = to_dict(load_config("configs/smoke.yaml"))
    out = tmp_path / "tune"
    out.mkdir()
    searched = tmp_path / "space.yaml"
    searched.write_text(text)
    settings = Settings(out=out, config=config, space=space.load_space(searched, config).to_dict(),
                        folds=list(folds), executor="local", sampler="random", seed=0, pruner="none",
                        pruner_startup=1, pruner_warmup=0, fold_order="sequential", trials=trials, parallel=1,
                        steps_per_fold=2, recipe="configs/smoke.yaml", space_file=str(searched))
    settings.save()
    return settings


def states(out: Path) -> list[str]:
    return [t.state.name for t in load_trials(out)]


def test_a_diverged_trial_is_pruned_for_the_sampler_and_does_not_stop_the_search(tmp_path, records, capsys):
    """A learning rate too high is an answer of the search (pruned and infeasible: TPE ranks it below
    every complete and pruned trial), not a broken set-up: three of them in a row do not end the study."""
    records.outcome = staticmethod(lambda number: "diverged" if number < 3 else "done")
    settings = settings_of(tmp_path)
    assert launch.study_run(settings, resumed=False) == 0
    assert states(settings.out) == ["PRUNED", "PRUNED", "PRUNED", "COMPLETE"]
    assert "trial 0 PRUNED: fold0 diverged (its loss is no longer finite)" in capsys.readouterr().err
    # infeasible: TPE ranks it below every complete and pruned trial, however far it got
    assert [max(t.constraints.values(), default=0.0) > 0 for t in load_trials(settings.out)] == [True] * 3 + [False]


@pytest.mark.parametrize("trials, status", [(8, 1), (4, 0)], ids=["trials-owed", "study-full"])
def test_trials_failing_in_a_row_end_the_launcher_with_a_failure_and_how_to_go_on(tmp_path, records, capsys,
                                                                                  trials, status):
    """Only while the study still owes trials: the last three of a full study failing end it as usual."""
    records.outcome = staticmethod(lambda number: "done" if number == 0 else "failed")
    settings = settings_of(tmp_path, trials=trials)
    assert launch.study_run(settings, resumed=False) == status
    assert states(settings.out) == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    err = capsys.readouterr().err
    assert (f"3 trials failed in a row, so no new trial was started: their logs say why; once that is fixed, "
            f"dist-lc tune --out {settings.out} --resume goes on" in err) is (status == 1)


def test_trials_whose_parameters_the_config_refuses_together_do_not_stop_the_search(tmp_path, records, capsys):
    """GroupNorm's groups must divide the channels: a combination of values that each pass alone.
    Such trials fail without a job (nothing to fix, no log to read): the study still draws all its
    trials, and says why each one failed."""
    settings = settings_of(tmp_path, LR + "model.norm: [group]\nmodel.groups: [3]\n", trials=4)
    assert launch.study_run(settings, resumed=False) == 1   # no trial completed
    assert states(settings.out) == ["FAIL"] * 4
    err = capsys.readouterr().err
    assert err.count("FAILED: its config is refused") == 4 and "in a row" not in err
    assert "are not divisible by model.groups 3 (GroupNorm)" in err


@pytest.mark.parametrize("argv, executor, parallel", [
    (["--set", "launcher.max_parallel=2"], "local", 2),
    (["--parallel", "3", "--set", "launcher.max_parallel=2"], "local", 3),
    (["--set", "launcher.executor=slurm", "--set", "launcher.max_parallel=5"], "slurm", 5),
    ([], "local", 1),
], ids=["set parallel", "option wins", "set executor", "as saved"])
def test_a_resume_runs_the_executor_and_parallel_jobs_its_launcher_keys_say(tmp_path, argv, executor, parallel):
    """``--set launcher.max_parallel=N`` on a resume changed the trials' config but not the scheduler's
    jobs at once (nor ``launcher.executor`` the executor): the two would disagree on the jobs' room."""
    from dist_lc.cli import build_parser

    settings = settings_of(tmp_path)
    settings.config["launcher"]["max_parallel"] = settings.parallel   # as a new study saves it
    settings.save()
    args = build_parser()[0].parse_args(["tune", "--out", str(settings.out), "--resume", *argv])
    resumed = launch.resumed_settings(args)
    launcher = resumed.config["launcher"]
    assert (resumed.executor, resumed.parallel) == (executor, parallel)
    assert (launcher["executor"], launcher["max_parallel"]) == (executor, parallel)


def test_a_trial_whose_results_cannot_be_read_fails_alone_and_the_search_goes_on(tmp_path, records, capsys,
                                                                                monkeypatch):
    """A damaged done.json (or metrics.csv) of one trial: that trial fails, its jobs cancelled, naming
    the file; the launcher does not end every trial's jobs with it."""
    from dist_lc.tune import scheduler

    read = scheduler.progress.read_trial

    def damaged(plan):
        if plan.cv_dir.name == "1":
            raise InputError(f"{plan.cv_dir / 'fold0' / 'done.json'}: unreadable fold result")
        return read(plan)

    monkeypatch.setattr(scheduler.progress, "read_trial", damaged)
    settings = settings_of(tmp_path, trials=3)
    assert launch.study_run(settings, resumed=False) == 0
    assert states(settings.out) == ["COMPLETE", "FAIL", "COMPLETE"]
    assert (f"trial 1 FAIL: its folds' results cannot be read: {settings.out / 'trials' / '1' / 'fold0' / 'done.json'}: "
            "unreadable fold result; 1 job(s) cancelled") in capsys.readouterr().err
    assert "| 1 | fail | " in (settings.out / "report.md").read_text()   # the report still covers every trial


def test_a_trial_folder_of_other_parameters_is_not_taken_as_the_trials(tmp_path):
    """A study journal restored from an older copy numbers new trials as old ones: their CV folders
    (and finished folds) must not be reported as the new trials' results."""
    from dist_lc.tune.settings import trial_plan

    settings = settings_of(tmp_path)
    trial_plan(settings, 0, {"optim.lr": 1e-3})
    assert trial_plan(settings, 0, {"optim.lr": 1e-3}).points[0].params == {"optim.lr": 1e-3}
    with pytest.raises(InputError, match=r"trials/0/cv.json: holds other parameters \({'optim.lr': 0.001}\) than "
                                         r"trial 0 of the study \({'optim.lr': 0.002}\)"):
        trial_plan(settings, 0, {"optim.lr": 2e-3})


def test_a_trials_folds_log_to_the_studys_mlflow_store_under_an_experiment_named_after_both(tmp_path, monkeypatch):
    """The CV folder's own name (the trial's number) would put trial k of every study in one
    experiment of a shared tracking server, and each trial's store in its own folder."""
    from dist_lc.cv.plan import load_plan
    from dist_lc.tune.settings import trial_plan

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = settings_of(tmp_path)
    trial_plan(settings, 2, {"optim.lr": 1e-3})
    plan = load_plan(settings.trial_dir(2))   # as a fold job reads it
    train = plan.fold_config(plan.points[0], 0)["train"]
    assert (train["experiment"], train["mlflow_uri"]) == ("tune/trial2", (settings.out.resolve() / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")   # a server named: it is the store
    assert plan.fold_config(plan.points[0], 0)["train"]["mlflow_uri"] in ("", None)


def test_a_complete_trial_does_not_cancel_its_jobs_still_exiting(tmp_path, records, capsys):
    """done.json is written before the job's processes end: such a job is waited for, not cancelled."""
    settings = settings_of(tmp_path, trials=1)
    assert launch.study_run(settings, resumed=False) == 0
    assert "cancelled" not in capsys.readouterr().err


def test_a_trial_whose_parameters_a_killed_launcher_cut_short_draws_the_rest_on_resume(tmp_path, records):
    """Optuna journals a new trial and each of its parameters as separate lines: a launcher killed
    between them leaves a RUNNING trial with some. Its CV folder must not train the base config's
    value, unrecorded, for the others."""
    settings = settings_of(tmp_path, LR + "model.filters: [8, 24]\n", trials=1)
    study = open_study(settings)
    storage, distributions = study._storage, settings.search_space.distributions()
    trial_id = storage.create_new_trial(study._study_id)
    storage.set_trial_param(trial_id, "optim.lr", distributions["optim.lr"].to_internal_repr(3e-3),
                            distributions["optim.lr"])
    (settings.out / "trials").mkdir()
    assert launch.study_run(launch.load_settings(settings.out), resumed=True) == 0
    trial = load_trials(settings.out)[0]
    assert trial.state is TrialState.COMPLETE and trial.params["optim.lr"] == 3e-3
    filters = existing_plan(settings, 0).points[0].config["model"]["filters"]
    assert trial.params["model.filters"] in (8, 24) and filters == trial.params["model.filters"]


def test_a_resume_whose_launcher_cannot_run_a_running_trials_folds_is_refused_before_any_job(tmp_path, records):
    """3 ranks a job cannot share a batch of 16; a trial left running would fail fold after fold."""
    from dist_lc.tune.settings import trial_plan

    settings = settings_of(tmp_path, trials=2)
    study = open_study(settings)
    trial = study.ask(settings.search_space.distributions())
    trial_plan(settings, trial.number, trial.params)
    settings.config["launcher"]["tasks_per_node"] = 3
    with pytest.raises(InputError) as err:
        launch.study_run(settings, resumed=True)
    assert str(err.value).startswith(f"{settings.out / 'trials' / '0' / 'cv.json'}: the trial's folds cannot run "
                                     "with the launcher as now given (")
    assert not (settings.out / "trials" / "0" / "jobs.json").exists() and len(load_trials(settings.out)) == 1
    settings.config["launcher"]["tasks_per_node"] = 2   # 8 tiles a rank: its next folds run with 2 ranks
    plan = trial_plan(settings, trial.number, trial.params)
    assert plan.points[0].config["launcher"]["tasks_per_node"] == 2


def test_a_running_trial_whose_cv_json_is_damaged_fails_alone_on_resume(tmp_path, records, capsys):
    from dist_lc.tune.settings import trial_plan

    records.outcome = staticmethod(lambda number: "done")
    settings = settings_of(tmp_path, trials=2)
    study = open_study(settings)
    trial = study.ask(settings.search_space.distributions())
    plan = trial_plan(settings, trial.number, trial.params)
    (plan.cv_dir / "cv.json").write_text("{")
    assert launch.study_run(settings, resumed=True) == 0   # the other trial completes
    assert states(settings.out) == ["FAIL", "COMPLETE"]
    assert "trial 0 FAILED: its config is refused" in capsys.readouterr().err


def test_a_fold_that_diverged_while_no_launcher_watched_prunes_its_trial_on_resume(tmp_path, records, capsys):
    """Slurm jobs go on while the launcher is stopped: a resume that submitted the fold again would
    clear its note and train it to the same end."""
    from dist_lc.tune.settings import trial_plan

    records.outcome = staticmethod(lambda number: "done")
    settings = settings_of(tmp_path, trials=1)
    study = open_study(settings)
    trial = study.ask(settings.search_space.distributions())
    plan = trial_plan(settings, trial.number, trial.params)
    run_dir = plan.run_dir(plan.points[0], 0)
    run_dir.mkdir(parents=True)
    record_failure(run_dir, 0, Diverged("loss is not finite (NaN/inf) on 1 rank(s)"))
    launch.study_run(settings, resumed=True)
    assert states(settings.out) == ["PRUNED"] and load_trials(settings.out)[0].constraints == {"finite_loss": 1.0}
    assert "trial 0 PRUNED: fold0 diverged while no launcher watched it" in capsys.readouterr().err
    assert not (plan.cv_dir / "jobs.json").exists()   # nothing submitted again


def test_an_error_of_the_launcher_ends_its_jobs_before_it_is_raised(tmp_path, records, monkeypatch, capsys):
    from dist_lc.tune import scheduler

    ended = []
    monkeypatch.setattr(scheduler.Scheduler, "show", lambda self: (_ for _ in ()).throw(OSError(28, "disk full")))
    monkeypatch.setattr(scheduler.Scheduler, "interrupt", lambda self: ended.append(len(self.running)) or "1 job ended")
    with pytest.raises(OSError, match="disk full"):
        launch.study_run(settings_of(tmp_path), resumed=False)
    assert ended == [1] and "tune: the launcher failed; 1 job ended" in capsys.readouterr().err


def test_a_seed_at_the_top_of_its_range_still_resumes(tmp_path):
    """Each launch seeds its sampler with the seed plus the trials drawn; numpy takes 0 to 2**32 - 1."""
    settings = settings_of(tmp_path)
    settings.seed = 2**32 - 1
    for _ in range(2):
        study = open_study(settings)
        study.tell(study.ask(settings.search_space.distributions()), 0.5)
    assert len(load_trials(settings.out)) == 2


@pytest.mark.parametrize("spec", ["[16, 17]", "{int: [16, 4096]}"])   # a range too large to check every value
def test_searched_values_are_checked_against_the_ranks_of_a_job(tmp_path, capsys, spec):
    from dist_lc import cli

    searched = tmp_path / "space.yaml"
    searched.write_text(f"train.batch_size: {spec}\n")
    out = tmp_path / "tune"
    assert cli.main(["tune", "--config", "configs/smoke.yaml", "--set", "launcher.tasks_per_node=2", "--space",
                     str(searched), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {searched}: train.batch_size: 17 is refused by the config: 17 tiles cannot be "
                           "split evenly over 2 ranks"), line
    assert not out.exists()


def test_a_step_that_cuts_the_range_into_too_many_values_is_one_line(tmp_path):
    searched = tmp_path / "space.yaml"
    searched.write_text("optim.weight_decay: {float: [0.0, 1.0e+300], step: 1.0e-300}\n")
    with pytest.raises(InputError, match=r"optim.weight_decay: step 1e-300 cuts \[0.0, 1e\+300\] into more than"):
        space.load_space(searched, to_dict(load_config("configs/smoke.yaml")))


def test_more_trials_than_the_space_holds_is_a_warning(tmp_path, packed_sample, capsys):
    """The samplers draw a point again rather than end the study: each repeat a full CV run."""
    from dist_lc.tune.launch import new_settings
    from dist_lc import cli

    searched = tmp_path / "space.yaml"
    searched.write_text("model.filters: {int: [8, 16], step: 8}\noptim.name: [adam, adamw, sgd]\n")
    parser, _ = cli.build_parser()
    for trials, warned in ((6, False), (7, True)):
        new_settings(parser.parse_args(["tune", "--config", "configs/smoke.yaml", "--set", f"data.shards={packed_sample}",
                                        "--space", str(searched), "--out", str(tmp_path / "out"),
                                        "--trials", str(trials)]))
        err = capsys.readouterr().err
        assert ("the space holds 6 points and --trials is 7: some will be drawn (and run) more than once" in err) \
            is warned, err
    assert space.load_space(searched, to_dict(load_config("configs/smoke.yaml"))).points() == 6


def test_a_launcher_section_the_executor_refuses_is_named_as_such_not_as_a_searched_value(tmp_path, capsys):
    from dist_lc import cli

    searched = tmp_path / "space.yaml"
    searched.write_text(LR)
    assert cli.main(["tune", "--config", "configs/smoke.yaml", "--set", "launcher.time_min=1", "--space",
                     str(searched), "--out", str(tmp_path / "tune")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: config: launcher.time_min=1 leaves no time before the stop signal"), line


def test_a_note_of_an_earlier_launch_does_not_make_a_fold_diverged(tmp_path, records, capsys):
    """The fold diverged under a launcher that died before judging it; resubmitted, it fails without a
    note of its own: a failure, not the earlier divergence."""
    records.outcome = staticmethod(lambda number: "vanished")
    settings = settings_of(tmp_path, trials=1)
    open_study(settings)
    record_failure(settings.out / "trials" / "0" / "fold0", 0, Diverged("loss is not finite (NaN/inf) on 1 rank(s)"))
    launch.study_run(settings, resumed=False)
    assert states(settings.out) == ["FAIL"]


@pytest.mark.parametrize("lose", [1, 2])
def test_a_lost_fold_job_is_submitted_once_more(tmp_path, records, capsys, lose):
    """A fold whose job vanished without a note or an error (a lost node, a preemption) is submitted
    again, once: the trial completes; lost twice, it fails, and says so."""
    records.lose = lose
    settings = settings_of(tmp_path, trials=1)
    open_study(settings)
    launch.study_run(settings, resumed=False)
    err = capsys.readouterr().err
    assert err.count("was lost (gone, without done.json or an error); submitting it once more") == 1, err
    assert states(settings.out) == (["COMPLETE"] if lose == 1 else ["FAIL"])
    if lose == 2:
        assert "fold0 failed (gone without done.json)" in err, err


@pytest.mark.parametrize("seen,again", [(("Slurm state NODE_FAIL", "no longer in squeue"), True),
                                        (("Slurm state CANCELLED", "no longer in squeue"), False),
                                        (("Slurm state TIMEOUT",), False), (("no longer in squeue",), False)])
def test_a_slurm_job_is_submitted_again_only_when_slurm_said_its_node_failed(tmp_path, records, capsys, seen,
                                                                             again):
    """Judged by the first end state seen: Slurm lists an ended job only for MinJobAge (5 s on the
    local cluster), so by the end of the grace a cancelled job is only "no longer in squeue"."""
    records.lose, records.gone, records.lost = 1, seen, executors.SlurmExecutor.lost
    settings = settings_of(tmp_path, trials=1)
    open_study(settings)
    launch.study_run(settings, resumed=False)
    err = capsys.readouterr().err
    assert ("submitting it once more" in err) is again, err
    assert states(settings.out) == (["COMPLETE"] if again else ["FAIL"])
    if not again:
        assert f"fold0 failed ({seen[0]} without done.json)" in err, err


def test_a_lost_job_is_not_submitted_again_while_a_training_holds_its_folder(tmp_path, records, capsys):
    """Tasks that outlived their killed controller still train in the folder: a second job would be
    refused by the run lock, and the orphans would go on unwatched."""
    from lc_common.locks import held

    records.lose = 1
    settings = settings_of(tmp_path, trials=1)
    open_study(settings)
    run_dir = settings.out / "trials" / "0" / "fold0"
    run_dir.mkdir(parents=True)
    with held(run_dir / ".lock", "held"):
        launch.study_run(settings, resumed=False)
    err = capsys.readouterr().err
    assert "but a training still holds" in err and f"pid {os.getpid()} on" in err, err
    assert "submitting it once more" not in err and states(settings.out) == ["FAIL"]


class Clock:
    """time for the launchers: monotonic() only moves when they sleep, or when a test says so."""

    def __init__(self):
        import time

        self.real, self.now = time, 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def clock(monkeypatch, records):
    """A fake clock under cv's and tune's launchers; a lost job's second submission takes the
    whole computed wait budget (as a resubmitted fold that runs as long as the first would)."""
    from dist_lc.cv import launch as cv_launch
    from dist_lc.tune import scheduler

    fake = Clock()
    for module in (cv_launch, scheduler):
        monkeypatch.setattr(module, "time", fake)
    submit = records.submit

    def submit_then_age(self, work):
        out = submit(self, work)
        if any(self.submitted[Path(item.run_dir)] > 1 for item in work):
            fake.now += cv_launch.wait_budget_s(load_config("configs/smoke.yaml"), 1, 1)
        return out

    monkeypatch.setattr(records, "submit", submit_then_age)
    return fake


def test_a_lost_job_submitted_again_extends_the_searchs_wait_budget(tmp_path, records, clock, capsys):
    records.lose = 1
    settings = settings_of(tmp_path, trials=1)
    open_study(settings)
    assert launch.study_run(settings, resumed=False) == 0
    err = capsys.readouterr().err
    assert "submitting it once more" in err and "wait deadline passed" not in err, err
    assert states(settings.out) == ["COMPLETE"]


def test_a_passed_wait_deadline_ends_the_jobs_of_the_trials_it_leaves(tmp_path, records, monkeypatch, capsys):
    """As cv's launcher does: local jobs would run on with nothing watching them."""
    from dist_lc.tune import scheduler

    records.outcome = staticmethod(lambda number: "runs")
    monkeypatch.setattr(scheduler, "wait_budget_s", lambda *args: 0.2)
    settings = settings_of(tmp_path, trials=1)
    open_study(settings)
    assert launch.study_run(settings, resumed=False) == 1
    assert "wait deadline passed with trials unfinished; 1 job(s) ended: dist-lc tune --out" in capsys.readouterr().err


@pytest.mark.parametrize("order, at_once", [("sequential", 2), ("parallel", 5)])
def test_the_wait_budget_counts_sequential_folds_one_after_another(tmp_path, records, monkeypatch, order, at_once):
    """2 trials of 3 sequential folds, --parallel 5: two chains of 3 folds, not 6 jobs in two waves."""
    from dist_lc.tune import scheduler

    asked = []
    monkeypatch.setattr(scheduler, "wait_budget_s", lambda cfg, jobs, parallel: asked.append((jobs, parallel)) or 0.2)
    records.outcome = staticmethod(lambda number: "runs")
    settings = settings_of(tmp_path, trials=2, folds=(0, 1, 2))
    settings.parallel, settings.fold_order = 5, order
    settings.save()
    open_study(settings)
    launch.study_run(settings, resumed=False)
    assert asked == [(6, at_once)]


def test_a_deadline_after_the_search_gave_up_still_ends_the_trial_left_running(tmp_path, records, monkeypatch,
                                                                               capsys):
    from dist_lc.tune import scheduler

    records.outcome = staticmethod(lambda number: "runs" if number == 0 else "failed")
    monkeypatch.setattr(scheduler, "wait_budget_s", lambda *args: 0.5)
    settings = settings_of(tmp_path, trials=6)   # trials 1-3 fail in a row: no 5th or 6th is started
    settings.parallel = 4
    settings.save()
    open_study(settings)
    assert launch.study_run(settings, resumed=False) == 1
    err = capsys.readouterr().err
    assert "wait deadline passed with trials unfinished; 1 job(s) ended" in err and "failed in a row" in err, err


def cv_launch_of(out: Path, shards: Path, *sets: str):
    """A started cv launch of smoke.yaml on ``shards`` (the in-process part of ``dist-lc cv``)."""
    import argparse

    from dist_lc.cv import launch as cv_launch

    args = argparse.Namespace(config="configs/smoke.yaml", set=[f"data.shards={shards}", *sets], grid=None,
                              executor="local", out=out)
    plan = cv_launch.new_plan(args)
    plan.cv_dir.mkdir()
    plan.save()
    run = cv_launch.Launch(plan, [(plan.points[0].name, k) for k in plan.folds])
    run.start(resume=False)
    return run


def test_a_lost_job_submitted_again_extends_the_cvs_wait_budget(tmp_path, records, clock, packed_sample):
    from dist_lc.cv import launch as cv_launch

    records.lose = 1
    run = cv_launch_of(tmp_path / "cv", packed_sample, "cv.folds=[0]")
    assert run.wait(1, cv_launch.wait_budget_s(run.cfg, 1, run.capacity()))
    assert run.all_done and run.jobs[0].resubmitted


def test_lost_jobs_submitted_again_keep_to_max_parallel_where_the_scheduler_queues(tmp_path, records,
                                                                                  packed_sample, monkeypatch):
    """On Slurm the first array's throttle carries launcher.max_parallel; jobs submitted again are
    outside it, so the launcher submits them only as running ones finish."""
    import math

    sizes = []
    submit = records.submit
    monkeypatch.setattr(records, "capacity", lambda self: math.inf)
    monkeypatch.setattr(records, "submit", lambda self, work: sizes.append(len(work)) or submit(self, work))
    records.lose = 1
    run = cv_launch_of(tmp_path / "cv", packed_sample, "cv.folds=[0,1,2]", "launcher.max_parallel=2")
    assert run.wait(3, 60.0) and run.all_done
    assert sizes == [3, 2, 1]
