"""The executor interface of `dist-lc cv` (dist_lc/cv/executors.py).

The registry has a class for every executor name that LauncherConfig declares, and the launcher
names none of them: a new kind of executor is a new class. :class:`ThreadExecutor`, a kind made up
here (each job a thread of the test's own process), is registered in place of "local" and drives
`dist-lc cv` end to end (submit, poll, status, cancel, a stop signal, --resume) with no change to
dist_lc/cv/launch.py.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import re
import signal
import socket
import threading
import time
import types
import typing
from collections import Counter
from pathlib import Path

import pytest

import test_cv
from test_cv import tiny

from dist_lc import cli
from dist_lc.config import LauncherConfig
from dist_lc.cv import executors, launch
from dist_lc.cv.executors import Executor, JobState, Work
from dist_lc.cv.job import FoldJob
from dist_lc.cv.plan import Submission, now
from lc_common.errors import InputError



def test_every_declared_executor_name_has_its_class_and_no_other_name_has_one():
    declared = typing.get_args(typing.get_type_hints(LauncherConfig)["executor"])
    assert set(executors.EXECUTORS) == set(declared)
    for name, cls in executors.EXECUTORS.items():
        assert issubclass(cls, Executor) and cls.name == name and not getattr(cls, "__abstractmethods__", None)
    assert executors.executor_class("sbatch") is executors.SlurmExecutor   # cv.json of slurm/cv_array.sbatch
    with pytest.raises(InputError, match="executor 'nowhere': not one of local, slurm"):
        executors.executor_class("nowhere")


def test_the_launcher_names_no_executor():
    """Everything kind-specific lives in the executor classes."""
    source = Path(launch.__file__).read_text()
    names = "|".join(executors.EXECUTORS)
    assert not re.findall(rf"""["']({names})["']""", source)


# ----------------------------------------------------------------------------- an executor of threads

class ThreadJob:
    """One job of the ThreadExecutor: its work, a cancel request, the error of a failed task."""

    def __init__(self, work: Work):
        self.work, self.cancelled, self.error = work, threading.Event(), None


def run_the_fold(job: ThreadJob) -> None:
    FoldJob(job.work.config, str(job.work.run_dir), job.work.tta)()


class ThreadExecutor(Executor):
    """Each job a thread of this process running ``job_function``, one job at a time; what the
    launcher asked of it is counted in ``calls``."""

    name = "local"          # registered in place of the local executor for a test
    poll_s = 0.05
    gone_grace_s = 0.2
    task_failed_grace_s = 1.0
    job_function = staticmethod(run_the_fold)
    calls: Counter = Counter()
    _ids = itertools.count()

    def __init__(self, launcher, folder, jobs=1):
        super().__init__(launcher, folder, jobs)
        self.threads: dict[str, tuple[threading.Thread, ThreadJob]] = {}

    def capacity(self) -> float:
        return 1

    def submit(self, work: list[Work]) -> list[executors.Submitted]:
        self.calls["submit"] += 1
        out = []
        for item in work:
            job_id, job = f"thread{next(self._ids)}", ThreadJob(item)
            thread = threading.Thread(target=self._run, args=(job,), name=job_id, daemon=True)
            self.threads[job_id] = (thread, job)
            thread.start()
            log = Path(item.run_dir) / "thread.log"
            out.append((Submission(item.point, item.fold, self.name, job_id, str(log), str(log), now()), thread))
        return out

    def _run(self, job: ThreadJob) -> None:
        try:
            type(self).job_function(job)
        except BaseException as exc:  # noqa: BLE001 - a task's error, as a result pickle would hold it
            job.error = f"{type(exc).__name__}: {exc}"

    def refresh(self, records) -> None:
        self.calls["refresh"] += 1

    def presence(self, record, handle=None):
        self.calls["status"] += 1
        thread, _ = self.threads.get(record.job_id, (None, None))
        return (JobState.RUNNING, "") if thread is not None and thread.is_alive() else (None, "thread ended")

    def first_failure(self, record):
        _, job = self.threads.get(record.job_id, (None, None))
        return (job.error, record.stderr) if job is not None and job.error else None

    def cancel(self, record, handle=None) -> None:
        self.calls["cancel"] += 1
        self.threads[record.job_id][1].cancelled.set()

    def interrupt(self, jobs) -> str:
        self.calls["interrupt"] += 1
        for record, handle in jobs:
            self.cancel(record, handle)
            handle.join(timeout=30)
        return f"{len(jobs)} thread job(s) ended"


@pytest.fixture
def thread_executor(monkeypatch):
    monkeypatch.setitem(executors.EXECUTORS, "local", ThreadExecutor)
    monkeypatch.setattr(ThreadExecutor, "calls", Counter())
    return ThreadExecutor


def cv(shards, cv_dir: Path, *extra) -> list[str]:
    return ["cv", *tiny(shards, "launcher.tasks_per_node=1", *extra), "--out", str(cv_dir), "--executor", "local"]


def test_the_launcher_ends_a_job_whose_task_failed_through_its_executor(thread_executor, tiny_shards, tmp_path,
                                                                         capsys, monkeypatch):
    def a_task_fails_the_others_wait(job: ThreadJob) -> None:
        job.error = "rank 1: RuntimeError: injected"
        job.cancelled.wait(60)

    monkeypatch.setattr(ThreadExecutor, "job_function", staticmethod(a_task_fails_the_others_wait))
    assert cli.main(cv(tiny_shards, tmp_path / "cv", "cv.folds=[0]")) == 1
    err = capsys.readouterr().err
    assert "cv: fold0: a task failed 1 s ago and the job still runs; ending its other tasks" in err
    line = next(x for x in err.splitlines() if "fold0 FAILED" in x)
    assert "thread ended: rank 1: RuntimeError: injected" in line
    assert thread_executor.calls["cancel"] == 1


def stop_while_a_job_runs(sig: int, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """`dist-lc cv` in this process, ``sig`` sent to this process once a job runs (the job waits to
    be cancelled): (its exit status, its last line). The launcher's handlers must be gone after."""
    running, before = threading.Event(), signal.getsignal(sig)

    def wait_for_cancel(job: ThreadJob) -> None:
        running.set()
        job.cancelled.wait(60)

    def signal_once_running() -> None:
        if running.wait(60) and signal.getsignal(sig) is not before:   # the launcher's handler
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(ThreadExecutor, "job_function", staticmethod(wait_for_cancel))
    sender = threading.Thread(target=signal_once_running, daemon=True)
    sender.start()
    status = cli.main(argv)
    sender.join(timeout=5)
    assert signal.getsignal(sig) is before
    assert not [t for t in threading.enumerate() if t.name.startswith("thread")]   # the job ended
    return status, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_and_sighup_stop_the_launcher_as_sigterm_does(thread_executor, tiny_shards, tmp_path, capsys,
                                                           monkeypatch, sig, status):
    cv_dir = tmp_path / "cv"
    assert stop_while_a_job_runs(sig, cv(tiny_shards, cv_dir), capsys, monkeypatch) == \
        (status, f"cv: stopped by {sig.name}; 1 thread job(s) ended: dist-lc cv --out {cv_dir} --resume watches "
                 "the jobs still running and reruns the others")
    assert thread_executor.calls["interrupt"] == 1


def test_a_new_executor_class_runs_a_cv_end_to_end_and_a_stop_signal_hands_it_its_jobs(
        thread_executor, tiny_shards, tmp_path, capsys, monkeypatch):
    """SIGTERM to the launcher's own process while the first job runs: the executor's interrupt ends
    it, the launcher exits 143 with one line; --resume then runs both folds for real, one at a time
    (the executor's capacity), and reports."""
    cv_dir = tmp_path / "cv"
    status, last = stop_while_a_job_runs(signal.SIGTERM, cv(tiny_shards, cv_dir), capsys, monkeypatch)
    assert (status, last) == (143, f"cv: stopped by SIGTERM; 1 thread job(s) ended: dist-lc cv --out {cv_dir} "
                                   "--resume watches the jobs still running and reruns the others")
    assert thread_executor.calls["interrupt"] == 1

    monkeypatch.setattr(ThreadExecutor, "job_function", staticmethod(run_the_fold))
    assert cli.main(["cv", "--out", str(cv_dir), "--resume"]) == 0, capsys.readouterr().err[-3000:]
    assert "2 job(s) to run" in capsys.readouterr().err
    report = json.loads((cv_dir / "report.json").read_text())
    assert report["complete"] and [f["fold"] for f in report["folds"]] == [0, 1]
    records = json.loads((cv_dir / "jobs.json").read_text())["jobs"]
    assert [(r["fold"], r["executor"], r["job_id"][:6]) for r in records] == [(0, "local", "thread")] + \
        [(k, "local", "thread") for k in (0, 1)]
    assert thread_executor.calls["submit"] == 3 and thread_executor.calls["refresh"] >= 3


def test_jobs_per_gpu_share_each_gpu_and_its_memory(monkeypatch, tmp_path):
    """Two GPUs, one per job, two jobs per GPU: four at once, two on each GPU, each allowed half of
    the memory left beside the processes' CUDA contexts (the GPUs are pretended: nothing runs)."""
    from dist_lc.config import LauncherConfig
    from dist_lc.cv.executors import LocalExecutor, Work

    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    ex = LocalExecutor(LauncherConfig(gpus_per_node=1, jobs_per_gpu=2), tmp_path, jobs=4)
    assert ex.capacity() == 4
    seen = []
    for slot in range(4):
        job = ex._fold_job(Work("p0", slot, {}, str(tmp_path / f"f{slot}"), False), slot, 4)
        seen.append((ex.engine.parameters["visible_gpus"], job.gpu_share))
    assert seen == [((0,), 0.45), ((1,), 0.45), ((0,), 0.45), ((1,), 0.45)]   # every GPU busy before any shared


@pytest.mark.parametrize("sharing, parallel, share", [(1, 4, 0.45), (2, 6, 0.3), (2, 2, None)])
def test_the_memory_cap_of_a_shared_gpu_counts_the_jobs_that_run_on_it(monkeypatch, tmp_path, sharing, parallel,
                                                                        share):
    """launcher.max_parallel above the GPUs' jobs wraps around onto GPUs that then hold more jobs than
    jobs_per_gpu; below it, a GPU may hold one job only and need no cap."""
    from dist_lc.config import LauncherConfig
    from dist_lc.cv.executors import LocalExecutor, Work

    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    ex = LocalExecutor(LauncherConfig(gpus_per_node=1, jobs_per_gpu=sharing, max_parallel=parallel), tmp_path, jobs=6)
    assert ex.capacity() == parallel
    shares = {ex._fold_job(Work("p0", slot, {}, str(tmp_path / f"f{slot}"), False), slot, parallel).gpu_share
              for slot in range(parallel)}
    assert shares == {share}


def test_ending_local_jobs_survives_a_controller_that_ends_while_they_are_looked_at(monkeypatch, tmp_path):
    """Alive at the first look, gone at the second (its tree empty): the other jobs are still ended."""
    from dist_lc.config import LauncherConfig
    from dist_lc.cv import executors
    from dist_lc.cv.plan import Submission

    monkeypatch.setattr(executors, "_pid_alive", lambda job_id: True)
    monkeypatch.setattr(executors, "_process_tree", lambda root: [])
    record = Submission("p0", 0, "local", "999999999", "err", "res", "2026-01-01T00:00:00")
    said = executors.LocalExecutor(LauncherConfig(), tmp_path).interrupt([(record, None)])
    assert said == "1 local job(s) ended"


def test_more_requeues_than_the_local_controller_makes_are_refused():
    from dist_lc.config import LauncherConfig
    from dist_lc.cv.executors import LocalExecutor
    from lc_common.errors import InputError

    LocalExecutor.check_launcher(LauncherConfig(max_requeues=5))
    with pytest.raises(InputError, match=r"^config key 'launcher.max_requeues': 6, but submitit's local executor "
                                         r"restarts a job at most 5 times"):
        LocalExecutor.check_launcher(LauncherConfig(max_requeues=6))


def test_local_jobs_get_the_gpus_the_launcher_was_given(monkeypatch, tmp_path):
    """A launcher started on GPUs 2 and 3 (CUDA_VISIBLE_DEVICES) hands out 2 and 3, which is what its
    jobs' CUDA_VISIBLE_DEVICES must hold; a list by UUID, or more GPUs per job than it sees, is refused."""
    from lc_common.errors import InputError
    from dist_lc.cv.executors import LocalExecutor

    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    LocalExecutor.check_launcher(LauncherConfig(gpus_per_node=2))
    ex = LocalExecutor(LauncherConfig(gpus_per_node=1), tmp_path, jobs=2)
    given = []
    for slot in range(2):
        ex._fold_job(Work("p0", slot, {}, str(tmp_path / f"f{slot}"), False), slot, 2)
        given.append(ex.engine.parameters["visible_gpus"])
    assert given == [(2,), (3,)]
    with pytest.raises(InputError, match=r"'launcher.gpus_per_node': 4, but this machine shows 2 GPU"):
        LocalExecutor.check_launcher(LauncherConfig(gpus_per_node=4))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2e,GPU-1c0a")
    with pytest.raises(InputError, match="by number, not by UUID"):
        LocalExecutor.check_launcher(LauncherConfig(gpus_per_node=1))


def test_the_wait_budget_of_unlimited_slurm_capacity_is_one_wave_of_requeues():
    """Slurm's capacity is unlimited: all jobs are one wave, whose time and requeues the launcher
    waits for (it once came to 0 waves, and every Slurm CV gave up after 30 minutes)."""
    import math

    from dist_lc.config import load_config

    cfg = load_config("configs/cv5.yaml", ["launcher.time_min=240", "launcher.max_requeues=2"])
    assert launch.wait_budget_s(cfg, 5, math.inf) == 240 * 60 * 3 + 1800
    assert launch.wait_budget_s(cfg, 5, 2) == 3 * 240 * 60 * 3 + 1800
    assert launch.wait_budget_s(cfg, 0, math.inf) == 1800


@pytest.mark.parametrize("setup", [[], ["true"]], ids=["controller", "controller-under-a-shell"])
def test_a_cancelled_local_job_ends_quietly_without_a_traceback_on_the_launchers_terminal(tmp_path, setup):
    """A local job's controller writes to the launcher's stderr: interrupted itself (submitit's own
    cancel), it prints a KeyboardInterrupt traceback there. The executor interrupts the job's tasks
    instead, and the controller then ends by itself; also when ``launcher.setup`` puts a shell
    (the job's pid) above the controller."""
    import subprocess
    import sys

    from torchrun_util import REPO, env

    code = f"""
import time, types, submitit
from dist_lc.cv.executors import LocalExecutor, _children, children_of, _controller
ex = submitit.LocalExecutor(folder={str(tmp_path)!r})
ex.update_parameters(timeout_min=5, setup={setup!r})
job = ex.submit(time.sleep, 120)
deadline = time.monotonic() + 60
while not ((c := _controller(int(job.job_id), children_of())) and _children(c)) and time.monotonic() < deadline:
    time.sleep(0.1)
LocalExecutor._end_quietly([(types.SimpleNamespace(job_id=job.job_id), job)])
print("controller exit", job._process.wait(timeout=30))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "controller exit 0" in proc.stdout
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("then", ["poll", "exit"])
def test_a_local_cancel_returns_at_once_and_a_task_that_ignores_it_is_ended_later(tmp_path, then):
    """The launcher's loop is not held up by a cancel: the tasks are interrupted and the call
    returns; a task that does not end within LOCAL_QUIET_S (here 1 s) gets submitit's own cancel,
    which kills it: at a later poll, or when the launcher exits first."""
    import subprocess
    import sys

    from torchrun_util import REPO, env

    code = f"""
import signal, time, types, submitit
from pathlib import Path
import dist_lc.cv.executors as executors
from dist_lc.config import LauncherConfig

def deaf():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(120)

executors.LOCAL_QUIET_S = 1.0
engine = submitit.LocalExecutor(folder={str(tmp_path)!r})
engine.update_parameters(timeout_min=5)
job = engine.submit(deaf)
deadline = time.monotonic() + 60
while not ((c := executors._controller(int(job.job_id), executors.children_of())) and executors._children(c)) \\
        and time.monotonic() < deadline:
    time.sleep(0.1)
time.sleep(1)   # the task has set its handler
print("task", executors._children(c, executors.children_of())[0][0], flush=True)
ex = executors.LocalExecutor(LauncherConfig(), Path({str(tmp_path)!r}))
tick = time.monotonic()
ex.cancel_all([(types.SimpleNamespace(job_id=job.job_id), job)])
print("returned after", round(time.monotonic() - tick, 1))
time.sleep(0.5)
print("alive at 0.5 s", job._process.poll() is None, flush=True)
while {then!r} == "poll" and job._process.poll() is None and time.monotonic() - tick < 30:
    ex._escalate()
    time.sleep(0.1)
print("ended after", round(time.monotonic() - tick))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.rsplit(" ", 1) for line in proc.stdout.splitlines())
    assert float(lines["returned after"]) < 0.5 and lines["alive at 0.5 s"] == "True", proc.stdout
    if then == "poll":
        assert 1 <= int(lines["ended after"]) < 10, proc.stdout
    task, deadline = int(lines["task"]), time.monotonic() + 10   # submitit kills a second after its SIGINT
    while Path(f"/proc/{task}").exists() and (Path(f"/proc/{task}/stat").read_text().split()[2] not in "ZX"):
        assert time.monotonic() < deadline, "the cancelled job's task outlived its launcher"
        time.sleep(0.2)


def test_a_resume_takes_a_launcher_executor_given_with_set(packed_sample, tmp_path):
    """``--resume --set launcher.executor=slurm`` moves the rest of a local CV to Slurm, as
    ``--executor slurm`` does; without either, the plan's executor stays."""
    import argparse

    def args(*sets, executor=None, config=None):
        return argparse.Namespace(config=config, grid=[], set=list(sets), executor=executor, out=tmp_path / "cv")

    plan = launch.new_plan(args(f"data.shards={packed_sample}", executor="local", config="configs/smoke.yaml"))
    plan.cv_dir.mkdir()
    plan.save()
    assert launch.resumed_plan(args()).executor == "local"
    assert launch.resumed_plan(args("launcher.executor=slurm")).executor == "slurm"
    assert launch.resumed_plan(args(executor="slurm")).executor == "slurm"


def test_a_resumed_local_launch_keeps_the_slot_of_an_earlier_job_and_knows_a_reused_pid(monkeypatch, tmp_path):
    """A job of an earlier launch that still runs keeps its GPU: the rerun of another fold gets the
    other one. Its pid counts as the job only while it is a submitit controller: a pid the system
    gave to another process since (a reboot, a wrap-around) is a job that ended."""
    import subprocess
    import sys
    import types

    from dist_lc.cv.executors import LocalExecutor
    from dist_lc.cv.plan import Submission

    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    ex = LocalExecutor(LauncherConfig(gpus_per_node=1), tmp_path, jobs=2)
    fake = types.SimpleNamespace(job_id="1", paths=types.SimpleNamespace(stderr="e", result_pickle="r"))
    monkeypatch.setattr(ex.engine, "submit", lambda fn: fake)
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit.local._local"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        earlier = Submission("p0", 0, "local", str(controller.pid), "e", "r", "t", 1, slot=0)
        assert ex.presence(earlier)[0] is JobState.RUNNING
        assert ex.presence(Submission("p0", 0, "local", str(other.pid), "e", "r", "t"))[0] is None
        ex.adopt(earlier)
        (record, _), = ex.submit([Work("p0", 1, {}, str(tmp_path / "f1"), False)])
        assert record.slot == 1 and ex.engine.parameters["visible_gpus"] == (1,)
        assert record.layout == "2 slot(s) over GPUs [0, 1], 1 a job" and ex.refuses(record) is None
        # resumed with two jobs a GPU: slot 0 would be GPU 0 still, but slot 2, which a new job could
        # get, is GPU 0 too: the job of the earlier layout must end first
        earlier.layout = record.layout
        other_layout = LocalExecutor(LauncherConfig(gpus_per_node=1, jobs_per_gpu=2), tmp_path, jobs=4)
        assert other_layout.refuses(earlier) == (f"job {controller.pid} still runs on slot 0 of 2 slot(s) over GPUs "
                                                 "[0, 1], 1 a job, and the launcher keys given now make 4 slot(s) "
                                                 "over GPUs [0, 1], 1 a job")
        assert other_layout.refuses(Submission("p0", 0, "local", str(other.pid), "e", "r", "t", 1, slot=0,
                                               layout=record.layout)) is None   # not running: nothing held
    finally:
        for proc in (controller, other):
            proc.kill()
            proc.wait()


def saved_plan(shards, tmp_path) -> Path:
    """A CV folder of smoke.yaml as `dist-lc cv` leaves it before its first submission."""
    cv_dir = tmp_path / "cv"
    args = ["cv", "--config", "configs/smoke.yaml", "--set", f"data.shards={shards}", "--out", str(cv_dir),
            "--executor", "local"]
    plan = launch.new_plan(cli.build_parser()[0].parse_args(args))
    cv_dir.mkdir()
    plan.save()
    return cv_dir


def test_a_second_launcher_on_a_cv_folder_is_refused(packed_sample, tmp_path, capsys):
    """A second `dist-lc cv --resume` beside a running one would submit its queued folds again."""
    from lc_common.locks import held

    cv_dir = saved_plan(packed_sample, tmp_path)
    with held(cv_dir / launch.LOCK, "held"):   # as the running launcher holds it
        assert cli.main(["cv", "--out", str(cv_dir), "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: {re.escape(str(cv_dir))}: another dist-lc cv \(pid {os.getpid()} on "
                        rf"{re.escape(socket.gethostname())} since [0-9: -]+\) is running this CV; wait for it, or stop "
                        "it and add --resume", line), line
    assert not (cv_dir / "jobs.json").exists()


def test_a_resume_refuses_a_fold_that_a_training_it_does_not_list_holds(packed_sample, tmp_path, capsys):
    """cv_array.sbatch's tasks are in no jobs.json: a resume while they run would train their folds twice."""
    from lc_common.locks import held

    cv_dir = saved_plan(packed_sample, tmp_path)
    run_dir = cv_dir / "fold1"
    run_dir.mkdir()
    with held(run_dir / ".lock", "held"):   # as an array task's training holds it
        assert cli.main(["cv", "--out", str(cv_dir), "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume: fold1: {run_dir} is held by a training that no job of this folder "
                           f"runs (pid {os.getpid()} on "), line
    assert line.endswith("an array task of slurm/cv_array.sbatch?); wait for it to end, or end it"), line
    assert not (cv_dir / "jobs.json").exists()


def test_an_error_pickle_older_than_the_local_job_is_an_earlier_jobs(tmp_path):
    """A local job's folder is named by its pid: after the pids wrap around, a new job can find the
    error pickle of an earlier one there, which must not fail it."""
    import submitit

    from dist_lc.cv.executors import LocalExecutor
    from dist_lc.cv.plan import Submission, now

    result = tmp_path / "4242" / "4242_0_result.pkl"
    result.parent.mkdir()
    submitit.core.utils.cloudpickle_dump(("error", "RuntimeError: CUDA out of memory (an earlier job)"), result)
    os.utime(result, (time.time() - 3600, time.time() - 3600))
    record = Submission("p0", 0, "local", "4242", str(tmp_path / "4242" / "4242_0_log.err"), str(result), now())
    ex = LocalExecutor(LauncherConfig(), tmp_path)
    assert ex.first_failure(record) is None
    os.utime(result)   # written by this job
    assert ex.first_failure(record)[0] == "RuntimeError: CUDA out of memory (an earlier job)"


# ----------------------------------------------------------------------------- a launcher that ends or submits badly

def wait_for_cancel(job: ThreadJob) -> None:
    job.cancelled.wait(60)


def thread_jobs_end(limit_s: float = 30) -> bool:
    deadline = time.monotonic() + limit_s
    while [t for t in threading.enumerate() if t.name.startswith("thread")]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_error_that_ends_the_launcher_hands_its_jobs_to_the_executor_first(thread_executor, tiny_shards,
                                                                              tmp_path, capsys, monkeypatch):
    """Not only a stop signal: an error while the jobs run (a bug, a failed write) must not leave
    local jobs running with nothing watching them. The error itself is raised after."""
    import errno

    monkeypatch.setattr(ThreadExecutor, "job_function", staticmethod(wait_for_cancel))
    polls = Counter()

    def poll_fails(self):
        polls["n"] += 1
        if polls["n"] == 3:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(launch.Launch, "poll", poll_fails)
    cv_dir = tmp_path / "cv"
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(cv(tiny_shards, cv_dir, "cv.folds=[0]"))
    assert thread_executor.calls["interrupt"] == 1 and thread_jobs_end()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cv: ended by the error below; 1 thread job(s) ended: after a fix, dist-lc cv --out {cv_dir} --resume "
        "watches the jobs still running and reruns the others")


def test_jobs_whose_record_cannot_be_written_are_cancelled(thread_executor, tiny_shards, tmp_path, capsys,
                                                          monkeypatch):
    """A job missing from jobs.json would run on unwatched, and --resume would submit its fold again
    beside it: a failed write cancels the jobs just submitted, then is reported in one line."""
    import errno

    from lc_common.errors import WriteError

    def no_room(cv_dir, new):
        raise WriteError(Path(cv_dir) / "jobs.json", OSError(errno.EDQUOT, "Disk quota exceeded"))

    monkeypatch.setattr(ThreadExecutor, "job_function", staticmethod(wait_for_cancel))
    monkeypatch.setattr(launch, "add_submissions", no_room)
    cv_dir = tmp_path / "cv"
    assert cli.main(cv(tiny_shards, cv_dir, "cv.folds=[0]")) == 1
    assert thread_executor.calls["submit"] == 1 and thread_executor.calls["cancel"] == 1 and thread_jobs_end()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-3:] == [f"cv: {cv_dir}/jobs.json not written: cancelling the 1 job(s) just submitted",
                        f"cv: ended by the error below; no job was running: after a fix, dist-lc cv --out {cv_dir} "
                        "--resume watches the jobs still running and reruns the others",
                        f"error: {cv_dir}/jobs.json: cannot write: Disk quota exceeded"]


def test_a_local_submission_that_fails_midway_cancels_the_jobs_it_started(monkeypatch, tmp_path):
    """The jobs started before the failure are returned to no one: nothing would record or watch them."""
    import errno
    import types

    from dist_lc.cv.executors import LocalExecutor

    ex = LocalExecutor(LauncherConfig(max_parallel=2), tmp_path, jobs=2)
    started = types.SimpleNamespace(job_id="1", paths=types.SimpleNamespace(stderr="e", result_pickle="r"))
    outcomes = iter([started, OSError(errno.EAGAIN, "Resource temporarily unavailable")])

    def submit(fn):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(ex.engine, "submit", submit)
    cancelled = []
    monkeypatch.setattr(ex, "cancel_all", cancelled.extend)
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        ex.submit([Work("p0", k, {}, str(tmp_path / f"f{k}"), False) for k in (0, 1)])
    assert [(record.job_id, handle) for record, handle in cancelled] == [("1", started)]


# ----------------------------------------------------------------------------- sbatch on a busy controller

FAKE_SBATCH = """#!/bin/sh
# fails its first {fails} calls with the error given, then submits job 4242; counts its calls
n=$(($(cat "{calls}" 2>/dev/null || echo 0) + 1))
echo "$n" > "{calls}"
if [ "$n" -le {fails} ]; then echo "sbatch: error: Batch job submission failed: {error}" >&2; exit 1; fi
echo "Submitted batch job 4242"
"""
TIMEOUT = "Socket timed out on send/recv operation"


def slurm_with_fake_sbatch(tmp_path, monkeypatch, fails: int, error: str = TIMEOUT):
    """A SlurmExecutor whose sbatch (first on PATH) fails ``fails`` times; the file counting its calls."""
    calls, bin_dir = tmp_path / "sbatch-calls", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(fails=fails, calls=calls, error=error))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ex = executors.SlurmExecutor(LauncherConfig(), tmp_path / "submitit", jobs=2)
    return ex, [Work("p0", k, {}, tmp_path / f"fold{k}", False) for k in (0, 1)], calls


def test_sbatch_errors_of_a_busy_controller_are_busy_and_a_refusal_one_line_at_once(tmp_path, monkeypatch, capsys):
    """A busy controller is worth another try (the launcher's); a refused request is not. sbatch's
    own words are said once, in the error, not also by submitit."""
    ex, work, calls = slurm_with_fake_sbatch(tmp_path, monkeypatch, fails=1)
    with pytest.raises(executors.Busy, match=f"^Batch job submission failed: {TIMEOUT}$"):
        ex.submit(work)
    assert [record.job_id for record, _ in ex.submit(work)] == ["4242_0", "4242_1"]
    assert calls.read_text().strip() == "2" and capsys.readouterr().err == ""
    refused = "Invalid account or account/partition combination specified"
    (tmp_path / "refused").mkdir()
    ex, work, calls = slurm_with_fake_sbatch(tmp_path / "refused", monkeypatch, fails=99, error=refused)
    with pytest.raises(InputError, match=rf"^sbatch refused the jobs: Batch job submission failed: {refused} "
                                         r"\(launcher.partition, launcher.account, launcher.slurm_extra\?\); none was "
                                         "submitted; after a fix, --resume submits them$"):
        ex.submit(work)
    assert calls.read_text().strip() == "1"


class BusyExecutor(ThreadExecutor):
    """A scheduler too busy to take the first ``busy`` submissions."""
    busy = 0

    def submit(self, work):
        self.calls["tried"] += 1
        if self.calls["tried"] <= type(self).busy:
            raise executors.Busy("Socket timed out on send/recv operation")
        return super().submit(work)


@pytest.mark.parametrize("busy, status", [(2, 0), (99, 2)], ids=["then-takes-them", "always"])
def test_a_busy_scheduler_is_asked_again_then_given_up_on_in_one_line(thread_executor, tiny_shards, tmp_path,
                                                                     monkeypatch, capsys, busy, status):
    monkeypatch.setitem(executors.EXECUTORS, "local", BusyExecutor)
    monkeypatch.setattr(BusyExecutor, "busy", busy)
    monkeypatch.setattr(executors, "SUBMIT_BACKOFF_S", (0.01, 0.01, 0.01))
    assert cli.main(cv(tiny_shards, tmp_path / "cv", "cv.folds=[0]", "train.epochs=1")) == status
    err = capsys.readouterr().err
    assert err.count("cv: the scheduler did not take the jobs (Socket timed out on send/recv operation); trying "
                     "again in 0.01 s") == min(busy, 3)
    if status:
        assert err.strip().splitlines()[-1] == (
            "error: the scheduler refused the jobs 4 times in a row: Socket timed out on send/recv operation (busy "
            "or down); none was submitted; once it answers, --resume submits them")


def test_a_stop_while_waiting_for_a_busy_scheduler_ends_the_launcher_at_once(thread_executor, tiny_shards, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.setitem(executors.EXECUTORS, "local", BusyExecutor)
    monkeypatch.setattr(BusyExecutor, "busy", 99)
    monkeypatch.setattr(executors, "SUBMIT_BACKOFF_S", (60.0, 60.0, 60.0))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    assert cli.main(cv(tiny_shards, tmp_path / "cv", "cv.folds=[0]")) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 30
    assert "cv: stopped by SIGTERM" in capsys.readouterr().err


def test_a_passed_wait_deadline_ends_the_local_jobs_it_leaves(thread_executor, tiny_shards, tmp_path, capsys,
                                                               monkeypatch):
    """As after a stop: nothing would watch them once the launcher is gone; --resume reruns them."""
    monkeypatch.setattr(ThreadExecutor, "job_function", staticmethod(lambda job: job.cancelled.wait(60)))
    monkeypatch.setattr(launch, "wait_budget_s", lambda *args: 0.5)
    assert cli.main(cv(tiny_shards, tmp_path / "cv", "cv.folds=[0]")) == 1
    assert ("cv: wait deadline passed with jobs unfinished; 1 thread job(s) ended: dist-lc report"
            in capsys.readouterr().err)
    assert ThreadExecutor.calls["interrupt"] == 1


def test_a_launcher_started_under_nohup_outlives_a_sighup(tiny_shards, tmp_path):
    """`nohup dist-lc cv ... &`, then the terminal closes: the launcher and its job go on; SIGTERM
    still stops it. (A launcher of ThreadExecutor jobs, in a process of its own.)"""
    import shutil
    import subprocess
    import sys

    from torchrun_util import REPO, env

    if shutil.which("nohup") is None:
        pytest.skip("needs nohup (coreutils)")
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import test_executors as t
from dist_lc import cli
from dist_lc.cv import executors

def wait_for_cancel(job):
    print("running", flush=True)
    job.cancelled.wait(120)

executors.EXECUTORS["local"] = t.ThreadExecutor
t.ThreadExecutor.job_function = staticmethod(wait_for_cancel)
sys.exit(cli.main(sys.argv[1:]))
"""
    cv_dir = tmp_path / "cv"
    proc = subprocess.Popen(["nohup", sys.executable, "-c", code, *cv(tiny_shards, cv_dir, "cv.folds=[0]")],
                            cwd=REPO, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = threading.Timer(120, proc.kill)   # readline() has no limit of its own
    deadline.start()
    try:
        assert proc.stdout.readline() == "running\n", proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None, proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        deadline.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("cv: stopped by SIGTERM; 1 thread job(s) ended"), err[-3000:]


def test_one_squeue_serves_every_trial_of_a_poll(tmp_path, monkeypatch):
    """A search polls each trial's jobs in turn after one look at them all: the looks of the trials
    moments later ask squeue nothing more; a job outside the look, or the next poll, asks again."""
    asked = []

    def slow_squeue(ids):   # a busy controller: longer than the look stays fresh
        time.sleep(executors.SlurmExecutor.poll_s * 0.6)
        asked.append(ids)
        return {i: "RUNNING" for i in ids}

    monkeypatch.setattr(executors, "slurm_states", slow_squeue)
    slurm = executors.SlurmExecutor(LauncherConfig(), tmp_path, 4)
    records = [Submission("", k, "slurm", str(100 + k), "o", "e", now()) for k in range(4)]
    slurm.refresh(records)                     # the scheduler's look at every trial's jobs
    for record in records:                     # each trial's own look, moments later
        slurm.refresh([record])
        assert slurm.presence(record)[0] is JobState.RUNNING
    assert asked == [["100", "101", "102", "103"]]
    slurm.refresh([Submission("", 9, "slurm", "109", "o", "e", now())])
    slurm._looked_at -= slurm.poll_s   # the next poll
    slurm.refresh(records)
    assert asked[1:] == [["109"], ["100", "101", "102", "103"]]


class RecordingEngine:
    """A submitit executor stand-in that keeps the environment each submission saw."""

    def __init__(self):
        self.seen = []

    def submit(self, fn):
        self.seen.append(dict(os.environ))
        return types.SimpleNamespace(job_id=str(len(self.seen)),
                                     paths=types.SimpleNamespace(stderr="err", result_pickle="result"))

    def update_parameters(self, **_):
        pass

    @contextlib.contextmanager
    def batch(self):
        yield


@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_jobs_do_not_inherit_the_launchers_allocation_or_rendezvous(kind, monkeypatch, tmp_path):
    """A launcher run inside a Slurm allocation (an salloc shell) or with MASTER_PORT exported: its
    jobs get neither (srun refuses SLURM_MEM_PER_CPU beside the job's own --mem; one port for every
    job collides), the cluster's SLURM_CONF stays, and the launcher's own environment is as before."""
    outer = {"SLURM_JOB_ID": "77", "SLURM_MEM_PER_CPU": "4000", "SLURM_CPUS_PER_TASK": "8", "MASTER_PORT": "29500",
             "SBATCH_PARTITION": "cpu", "SLURM_CONF": "/etc/slurm/other.conf"}
    for name, value in outer.items():
        monkeypatch.setenv(name, value)
    ex = executors.executor_class(kind)(LauncherConfig(), tmp_path, jobs=2)
    engine = ex._engine = RecordingEngine()
    ex.submit([Work("", fold, {}, str(tmp_path / f"fold{fold}"), False) for fold in (0, 1)])
    assert len(engine.seen) == 2
    for seen in engine.seen:
        assert seen["SLURM_CONF"] == "/etc/slurm/other.conf"
        assert not {name for name in outer if name != "SLURM_CONF"} & set(seen), seen
    assert {name: os.environ.get(name) for name in outer} == outer


def test_ranks_and_gpus_per_node_must_match():
    """One rank per GPU: fewer ranks leave GPUs idle, more put two ranks on one GPU (NCCL refuses it
    after the job has queued)."""
    from dist_lc.config import load_config

    for tasks in (1, 8):
        cfg = load_config("configs/cv5.yaml", [f"launcher.tasks_per_node={tasks}", "train.batch_size=64"])
        with pytest.raises(InputError, match=rf"launcher.tasks_per_node={tasks} with launcher.gpus_per_node=4: "
                                             "each rank trains on one GPU"):
            launch.check_launcher(cfg, "slurm")
    launch.check_launcher(load_config("configs/cv5.yaml"), "slurm")
    launch.check_launcher(load_config("configs/cv5.yaml", ["launcher.gpus_per_node=0", "launcher.tasks_per_node=2"]),
                          "slurm")


def test_a_job_that_holds_gpus_trains_on_them_or_says_why_not(monkeypatch):
    """``train.device: auto`` in a job given GPUs would fall back to the CPU under a torch without
    CUDA and train there, unnoticed, while the GPUs idle: it is one line instead."""
    from dist_lc.config import load_config
    from dist_lc.cv.fold import job_device

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(InputError, match=r"'launcher.gpus_per_node' is 4 but this job sees no CUDA device \(torch "):
        job_device(load_config("configs/cv5.yaml"))
    assert job_device(load_config("configs/cv5.yaml", ["train.device=cpu"])) == "cpu"
    assert job_device(load_config("configs/cv5.yaml", ["launcher.gpus_per_node=0", "launcher.tasks_per_node=4"])) \
        == "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert job_device(load_config("configs/cv5.yaml")) == "cuda"


def test_a_peer_error_of_the_attempt_before_a_local_requeue_does_not_fail_the_next(tmp_path, monkeypatch):
    """Rank 0 requeued (exit 144) in the middle of a collective; rank 1 failed on the lost connection
    and wrote its error pickle; the controller restarts both tasks with the same files: each task
    removes its own at start, before the launcher could take it for the new attempt's failure."""
    import submitit

    from dist_lc.cv import executors, fold
    from dist_lc.cv.plan import Submission, now

    folder = tmp_path / "4242"
    folder.mkdir()
    stale = folder / "4242_1_result.pkl"
    submitit.core.utils.cloudpickle_dump(("error", "RuntimeError: connection closed by peer"), stale)
    record = Submission("p0", 0, "local", "4242", str(folder / "4242_0_log.err"), str(folder / "4242_0_result.pkl"),
                        now(), tasks=2)
    assert executors.LocalExecutor(LauncherConfig(), tmp_path).first_failure(record)[0] == \
        "rank 1: RuntimeError: connection closed by peer"
    for name, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_FOLDER": str(tmp_path / "%j"),
                        "SUBMITIT_LOCAL_JOB_ID": "4242", "SUBMITIT_LOCAL_GLOBALID": "1"}.items():
        monkeypatch.setenv(name, value)
    fold.forget_earlier_attempt()   # rank 1 of the requeued attempt starts
    assert not stale.exists() and executors.LocalExecutor(LauncherConfig(), tmp_path).first_failure(record) is None


def test_a_task_failure_gone_at_the_next_look_restarts_the_grace():
    """A requeued local attempt's tasks run: the earlier attempt's failure, seen in the moment between
    the two, must not end the job a grace later."""
    from types import SimpleNamespace

    from dist_lc.cv.launch import Job, Launch

    seen = [("RuntimeError", "log"), None, ("RuntimeError", "log"), ("RuntimeError", "log"), ("RuntimeError", "log")]
    cancelled = []
    ex = SimpleNamespace(task_failed_grace_s=15.0, first_failure=lambda record: seen.pop(0),
                         cancel=lambda record, handle: cancelled.append(record))
    job = Job("p0", 0, Path("fold0"), executor=ex)
    for clock in (0.0, 10.0, 20.0, 30.0):
        Launch._end_if_a_task_failed(None, job, clock)
    assert cancelled == [] and job.task_failed_at == 20.0
    Launch._end_if_a_task_failed(None, job, 35.0)
    assert len(cancelled) == 1


def test_a_slurm_job_preempted_then_gone_is_lost_one_preempted_then_pending_runs_on(tmp_path, monkeypatch):
    """PreemptMode=REQUEUE: PREEMPTED, then PENDING again; PreemptMode=CANCEL: PREEMPTED, then out of
    squeue after MinJobAge, a job the launcher submits once more (its fold resumes)."""
    from dist_lc.cv import executors
    from dist_lc.cv.plan import Submission

    looks = iter([{"7": "PREEMPTED"}, {"7": "PENDING"}, {"7": "PREEMPTED"}, {}, {"8": "PREEMPTED"}, {"8": "RUNNING"},
                  {}])
    monkeypatch.setattr(executors, "slurm_states", lambda ids: next(looks))
    ex = executors.SlurmExecutor(LauncherConfig(), tmp_path)
    record = Submission("p0", 0, "slurm", "7", "err", "res", "2026-01-01T00:00:00")
    seen = []
    for _ in range(4):
        ex._looked_at = -math.inf   # each a poll of its own
        ex.refresh([record])
        seen.append(ex.presence(record))
    assert [state for state, _ in seen[:3]] == [JobState.RUNNING, JobState.PENDING, JobState.RUNNING]
    assert seen[3] == (None, "Slurm state PREEMPTED") and executors.SlurmExecutor.lost(seen[3][1])
    assert not executors.SlurmExecutor.lost("no longer in squeue")
    requeued = Submission("p0", 1, "slurm", "8", "err", "res", "2026-01-01T00:00:00")   # ran again, then ended
    for _ in range(3):
        ex._looked_at = -math.inf
        ex.refresh([requeued])
        last = ex.presence(requeued)
    assert last == (None, "no longer in squeue")
