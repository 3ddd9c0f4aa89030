"""Faults on a cluster, injected for real on CPU: killed ranks, damaged shards, an exception in one
rank, signals during a checkpoint write, a killed launcher, two trainings on one folder.

Every scenario is marked ``fault``; the run ends with ``faults survived: N of M`` (tests/conftest.py).
Faults come from tests/faults/sitecustomize.py (a test hook, not part of the product). The jobs train
a tiny U-Net on 32-pixel crops of 60 real tiles (5 folds of 12): 48 training tiles, batch 8, so an
epoch is 6 optimizer steps.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from slurm_util import require_slurm, sbatch, scancel, wait_job
from test_cv import run_cv, tiny
from torchrun_util import REPO, env, fault, torchrun

EPOCHS, STEPS_PER_EPOCH = 3, 6
BOUND_S = 60          # a failing job must end within this (train.dist_timeout_s is 20 here)
pytestmark = pytest.mark.fault


def recipe(shards, *extra) -> list[str]:
    sets = [f"data.shards={shards}", "data.crop=32", "data.workers=0", "data.shuffle_buffer=8",
            "model.filters=8", "model.upconv_filters=8", f"train.epochs={EPOCHS}", "train.batch_size=8",
            "train.micro_batch_size=4", "train.precision=fp32", "train.plot_every=0", "train.dist_timeout_s=20",
            "data.wait_timeout_s=15",
            "train.ema_decay=0.9", *extra]
    return ["-m", "dist_lc", "train", "--config", "configs/smoke.yaml", *[a for s in sets for a in ("--set", s)]]


def epochs_in(run: Path) -> list[int]:
    return list(pd.read_csv(run / "metrics.csv")["epoch"])


def weights(run: Path) -> dict:
    """last.pt's model and EMA weights (the latter's names prefixed with ``ema.``)."""
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return {**state["model"], **{f"ema.{k}": v for k, v in state["ema"].items()}}


def rank_logs(log_dir: Path) -> dict[int, str]:
    """Each rank's stderr of a torchrun started with --tee 3 --log-dir, all attempts joined."""
    out: dict[int, str] = {}
    for path in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        out[int(path.parent.name)] = out.get(int(path.parent.name), "") + path.read_text()
    return out


def logged_torchrun(args, log_dir: Path, **kw):
    return torchrun(["--tee", "3", "--log-dir", str(log_dir), *args], **kw)


@pytest.fixture(scope="module")
def straight(tiny_shards, tmp_path_factory):
    """The uninterrupted 2-rank run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    torchrun([*recipe(tiny_shards), "--run-dir", str(run)])
    return run


# A kill in each epoch, each rank (rank 0 writes the checkpoints) twice, each rank once after an
# epoch's last step (before its checkpoint): a restart from nothing, from epoch 1's and from epoch 2's
# checkpoint. DIST_LC_TEST_ALL_KILL_POINTS=1 runs every (rank, step) instead, a sweep of about 9 minutes here.
_ALL_POINTS = [(rank, step) for rank in (0, 1) for step in range(1, EPOCHS * STEPS_PER_EPOCH)]
KILL_POINTS = _ALL_POINTS if os.environ.get("DIST_LC_TEST_ALL_KILL_POINTS") else [(0, 2), (1, 6), (0, 12), (1, 14)]


@pytest.mark.slow
@pytest.mark.parametrize("rank,step", KILL_POINTS, ids=[f"rank{r}-step{s}" for r, s in KILL_POINTS])
def test_sigkill_of_one_rank_resumes_to_the_same_weights(tiny_shards, straight, tmp_path, rank, step):
    run, marker = tmp_path / "run", tmp_path / "killed"
    torchrun(["--max-restarts=1", *recipe(tiny_shards), "--run-dir", str(run)],
             extra_env=fault(f"kill step={step} rank={rank} marker={marker}"))
    assert marker.exists(), "the fault was not injected"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == EPOCHS * STEPS_PER_EPOCH
    assert epochs_in(run) == list(range(1, EPOCHS + 1))
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ from the uninterrupted run's"


def _damage(shards: Path, how: str) -> str:
    """Break one training shard of fold 1 (read by one rank only: 2 ranks, fold 0 validates)."""
    path = sorted(shards.glob("train-f1-*.tar"))[-1]
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # zeroed: same size, the tar ends early: only the rank that reads it can tell, mid-epoch
        path.write_bytes(data[: len(data) // 3] + bytes(len(data) - len(data) // 3))
    return path.name


@pytest.mark.parametrize("workers", [0, 2])   # in the rank; a worker beside another that reads on
@pytest.mark.parametrize("how", ["deleted", "truncated", "zeroed"])
def test_a_damaged_shard_stops_every_rank_with_its_name(tiny_shards, tmp_path, how, workers):
    shards = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(tiny_shards), str(shards)], check=True)
    name = _damage(shards, how)
    started = time.monotonic()
    proc = logged_torchrun([*recipe(shards, f"data.workers={workers}"), "--run-dir", str(tmp_path / "run")],
                           tmp_path / "logs", check=False, timeout=BOUND_S + 60)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0 and elapsed < BOUND_S, (elapsed, proc.stderr[-3000:])
    logs = rank_logs(tmp_path / "logs")
    for rank in (0, 1):
        last = [x for x in logs[rank].splitlines() if x.startswith("error: ")]
        assert last and name in last[-1], f"rank {rank}: {logs[rank][-2000:]}"


def test_an_exception_in_one_rank_ends_every_rank_with_its_cause(tiny_shards, tmp_path):
    started = time.monotonic()
    proc = logged_torchrun([*recipe(tiny_shards, "data.workers=1"), "--run-dir", str(tmp_path / "run")],
                           tmp_path / "logs", check=False, extra_env=fault("raise step=2 rank=1"),
                           timeout=BOUND_S + 60)
    assert proc.returncode != 0 and time.monotonic() - started < BOUND_S
    logs = rank_logs(tmp_path / "logs")
    assert "RuntimeError: injected fault after step 2" in logs[1]
    assert "error: rank 1 failed first: RuntimeError: injected fault after step 2" in logs[0], logs[0][-2000:]


def test_a_stuck_loader_worker_ends_every_rank_with_its_cause(tiny_shards, tmp_path):
    """A worker of rank 1 blocks forever in epoch 2: rank 1 stops after data.wait_timeout_s naming
    itself and what it waited for, rank 0 reports it as the first failure, nothing is left running."""
    started = time.monotonic()
    proc = logged_torchrun([*recipe(tiny_shards, "data.workers=1", "data.wait_timeout_s=5"),
                            "--run-dir", str(tmp_path / "run")], tmp_path / "logs", check=False,
                           extra_env={**fault("hang-loader epoch=1 rank=1"), "DIST_LC_TEST_TAG": str(tmp_path)},
                           timeout=BOUND_S + 60)
    assert proc.returncode != 0 and time.monotonic() - started < BOUND_S
    logs = rank_logs(tmp_path / "logs")
    cause = "rank 1: no batch from its 1 data loader worker(s) in 5 s (data.wait_timeout_s)"
    assert f"error: {cause}" in logs[1], logs[1][-2000:]
    assert f"error: rank 1 failed first: LoaderError: {cause}" in logs[0], logs[0][-2000:]
    assert epochs_in(tmp_path / "run") == [1]
    assert not tagged_processes(str(tmp_path), within_s=10)


def test_a_stuck_loader_worker_fails_its_cv_fold_with_its_cause(tiny_shards, tmp_path):
    """The same fault inside `dist-lc cv` (local executor, 2 tasks per fold): the fold is failed with
    rank 1's cause within the limit, the CV exits, and no task, forkserver or worker is left."""
    started = time.monotonic()
    proc = run_cv([*tiny(tiny_shards, "train.epochs=3", "cv.folds=[0]", "data.workers=1", "data.wait_timeout_s=5",
                         "train.dist_timeout_s=20"), "--out", str(tmp_path / "cv"), "--executor", "local"],
                  extra_env={**fault("hang-loader epoch=1 rank=1"), "DIST_LC_TEST_TAG": str(tmp_path)},
                  timeout=BOUND_S + 120)
    assert proc.returncode == 1 and time.monotonic() - started < BOUND_S + 30, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "fold0 FAILED" in x)
    assert "LoaderError: rank 1: no batch from its 1 data loader worker(s) in 5 s" in line, line
    assert not tagged_processes(str(tmp_path), within_s=10)


def test_the_local_executor_ends_a_job_whose_task_failed(tiny_shards, tmp_path):
    """Rank 1 raises, rank 0 never notices (it sleeps): as srun's --kill-on-bad-exit does on Slurm,
    the local executor ends the job's other task, and the fold is failed with rank 1's error."""
    started = time.monotonic()
    proc = run_cv([*tiny(tiny_shards, "train.epochs=20", "cv.folds=[0]", "train.dist_timeout_s=300",
                         "launcher.task_failed_grace_s=3"), "--out", str(tmp_path / "cv"), "--executor", "local"],
                  extra_env={**fault("raise-peers-hang step=2 rank=1"), "DIST_LC_TEST_TAG": str(tmp_path)},
                  timeout=BOUND_S + 120)
    assert proc.returncode == 1 and time.monotonic() - started < BOUND_S + 30, proc.stderr[-3000:]
    assert "a task failed 3 s ago and the job still runs; ending its other tasks" in proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "fold0 FAILED" in x)
    assert "rank 1: RuntimeError: injected fault after step 2" in line, line
    assert not tagged_processes(str(tmp_path), within_s=10)


def tagged_processes(tag: str, within_s: float = 0.0) -> list[str]:
    """Command lines of the live processes started with DIST_LC_TEST_TAG=tag (ranks, forkservers,
    loader workers, resource trackers: everything a launch started), once none is left or after
    ``within_s`` (they exit as they notice that their parent is gone)."""
    needle, deadline = f"DIST_LC_TEST_TAG={tag}\0".encode(), time.monotonic() + within_s
    while True:
        out = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (proc / "environ").read_bytes() and \
                        open(proc / "stat").read().rsplit(")", 1)[1].split()[0] not in "ZX":
                    out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        if not out or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _single(args, tmp_path, extra_env=None, timeout=180):
    """dist-lc in a process group of its own (the faults may signal the whole group)."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(**(extra_env or {})), capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


@pytest.fixture(scope="module")
def straight_single(tiny_shards, tmp_path_factory):
    """The uninterrupted one-process run every interrupted one must reproduce."""
    run = tmp_path_factory.mktemp("straight-single") / "run"
    assert _single([*recipe(tiny_shards), "--run-dir", str(run)], run.parent).returncode == 0
    return run


@pytest.mark.parametrize("action", ["term-in-save", "kill-in-save"])
def test_a_signal_during_a_checkpoint_write_never_leaves_a_truncated_checkpoint(tiny_shards, straight_single,
                                                                                tmp_path, action):
    """SIGTERM to the process group halfway through writing last.pt (the run stops at the next step
    and resumes), or SIGKILL there (last.pt stays the previous epoch's): last.pt always loads, the
    resumed run ends where the uninterrupted one does."""
    run = tmp_path / "run"
    first = _single([*recipe(tiny_shards), "--run-dir", str(run)], tmp_path, fault(f"{action} step=7"))
    assert first.returncode == (0 if action == "term-in-save" else -signal.SIGKILL), first.stderr[-2000:]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)   # loads: not truncated
    assert state["epoch"] == (2 if action == "term-in-save" else 1)
    if action == "term-in-save":
        assert "stop requested during epoch 3" in (run / "train.log").read_text()
    again = _single([*recipe(tiny_shards), "--run-dir", str(run)], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert epochs_in(run) == list(range(1, EPOCHS + 1))
    a, b = weights(straight_single), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ranks_of(run: Path) -> list[int]:
    """Pids of the processes whose command line names this run folder (the training ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(run).encode() in (proc / "cmdline").read_bytes():
                stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] not in ("Z", "X"):
                    pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_ranks_exit_when_their_launcher_is_killed_and_a_restart_never_crosses_them(tiny_shards, tmp_path):
    run, epochs = tmp_path / "run", 8
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           *recipe(tiny_shards, f"train.epochs={epochs}"), "--run-dir", str(run)]
    agent = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists():
            assert time.monotonic() < deadline and agent.poll() is None, "no epoch finished"
            time.sleep(0.2)
        os.killpg(agent.pid, signal.SIGKILL)   # the agent's own group: its ranks live in sessions of their own
        agent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _ranks_of(run) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _ranks_of(run), "ranks outlived their launcher"
    finally:
        for pid in _ranks_of(run):
            os.kill(pid, signal.SIGKILL)
    torchrun([*recipe(tiny_shards, f"train.epochs={epochs}"), "--run-dir", str(run)], timeout=300)
    assert epochs_in(run) == list(range(1, epochs + 1))
    assert "resuming after epoch" in (run / "train.log").read_text()


def test_a_second_training_on_the_same_folder_is_refused_and_a_stale_lock_taken_over(tiny_shards, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, *recipe(tiny_shards, "train.epochs=30"), "--run-dir", str(run)],
                             cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / ".lock").exists() or "pid" not in (run / ".lock").read_text():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = _single([*recipe(tiny_shards), "--run-dir", str(run)], tmp_path)
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert f"run folder in use by another training (pid {first.pid} on " in line, line
    finally:
        first.kill()
        first.wait()
    assert (run / ".lock").exists()   # left behind by the killed holder: stale, taken over
    again = _single([*recipe(tiny_shards, "train.epochs=1"), "--run-dir", str(run)], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]


def test_launches_without_a_run_dir_never_share_one(tiny_shards, tmp_path):
    """torchrun without --standalone or --rdzv-id has the run id 'none': two launches must still get two
    folders, and a restart within one launch (--max-restarts) keeps its folder and resumes."""
    args = [a if a != "configs/smoke.yaml" else str(REPO / "configs" / "smoke.yaml")
            for a in recipe(tiny_shards, "train.epochs=2")]
    for _ in range(2):
        port = str(__import__("torchrun_util").free_port())
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               f"--master-port={port}", *args], cwd=tmp_path, env=env(PYTHONPATH=str(REPO)),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("smoke-") for f in folders)
    assert all(epochs_in(f) == [1, 2] for f in folders)


def test_a_run_resumes_on_another_world_size_and_says_so(tiny_shards, tmp_path):
    run = tmp_path / "run"
    torchrun([*recipe(tiny_shards, "train.epochs=1"), "--run-dir", str(run)])
    proc = _single([*recipe(tiny_shards, "train.epochs=2"), "--run-dir", str(run)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (run / "train.log").read_text()
    assert "resuming after epoch 1 (trained so far on 2 rank(s) on cpu" in log
    assert epochs_in(run) == [1, 2]


@pytest.mark.slurm
def test_an_exception_in_one_srun_task_ends_the_job(tiny_shards, tmp_path):
    """train.sbatch's srun --kill-on-bad-exit: rank 1 raises, the job fails at once, not at its time limit."""
    require_slurm()
    run, log = tmp_path / "run", tmp_path / "job.out"
    sets = recipe(tiny_shards, "train.epochs=20")[5:]   # the --set pairs
    overrides = [v for k, v in zip(sets[::2], sets[1::2])]
    started = time.monotonic()
    job = sbatch(["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
                  f"--export=ALL,DIST_LC_TEST_FAULT=raise step=2 rank=1,PYTHONPATH={REPO / 'tests' / 'faults'}",
                  "-J", f"dlc-fault-{tmp_path.name[:16]}", "-o", str(log), str(REPO / "slurm" / "train.sbatch"),
                  "configs/smoke.yaml", str(run), *overrides])
    try:
        state = wait_job(job, timeout_s=BOUND_S + 60)
    finally:
        scancel(job)
    text = log.read_text()
    assert state == "FAILED" and time.monotonic() - started < BOUND_S + 30, text[-3000:]
    assert "injected fault after step 2" in text


@pytest.mark.slurm
def test_cv_names_the_failed_task_and_its_log_when_one_rank_fails(tiny_shards, tmp_path):
    """submitit job of 2 tasks, rank 1 raises: srun ends rank 0 too, cv reports rank 1's error and log."""
    require_slurm()
    cv_dir = tmp_path / "cv"
    started = time.monotonic()
    proc = run_cv([*tiny(tiny_shards, "train.epochs=20", "cv.folds=[0]", "train.dist_timeout_s=20"), "--out",
                   str(cv_dir), "--executor", "slurm"], extra_env=fault("raise step=2 rank=1"), timeout=BOUND_S + 120)
    assert proc.returncode == 1 and time.monotonic() - started < BOUND_S + 60, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "fold0 failed" in x)
    assert "rank 1: RuntimeError: injected fault after step 2" in line, line
    log = Path(line.split("log: ")[1].strip())
    assert log.name.endswith("_1_log.err") and "injected fault" in log.read_text()


@pytest.mark.parametrize("workers", [0, 2])
def test_predict_on_a_damaged_shard_exits_with_its_name(tiny_shards, smoke_run, tmp_path, workers):
    """A loader worker's error used to leave its workers alive at exit (SIGTERM ignored): a hang."""
    shards = tmp_path / "shards"
    subprocess.run(["cp", "-r", str(tiny_shards), str(shards)], check=True)
    path = sorted(shards.glob("test-*.tar"))[-1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] + bytes(len(data) - len(data) // 3))
    started = time.monotonic()
    proc = _single(["-m", "dist_lc", "predict", "--checkpoint", str(smoke_run / "checkpoints" / "best.pt"),
                    "--shards", str(shards), "--out", str(tmp_path / "p.csv"), "--workers", str(workers)],
                   tmp_path, timeout=BOUND_S)
    assert proc.returncode == 2 and time.monotonic() - started < BOUND_S
    assert path.name in proc.stderr.strip().splitlines()[-1] and not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------- `dist-lc cv` stopped by a signal

STOP_BOUND_S = 20     # a stopped `dist-lc cv` exits within this (its local jobs get 5 s, then are killed)


def _cv_started(args: list[str], tag: str, run_dirs: list[Path], timeout_s: float = 120) -> subprocess.Popen:
    """`dist-lc cv` in a session of its own (a signal reaches the launcher only, not its jobs nor
    pytest), returned once every fold's training has started (train.log)."""
    proc = subprocess.Popen([sys.executable, "-m", "dist_lc", "cv", *args], cwd=REPO, env=env(DIST_LC_TEST_TAG=tag),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not all((run / "train.log").exists() for run in run_dirs):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the folds did not start: {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return proc


def _stopped(proc: subprocess.Popen, sig: int) -> tuple[float, str]:
    """Send ``sig`` to the launcher; (seconds until it exited, its stderr)."""
    started = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=STOP_BOUND_S + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return time.monotonic() - started, err


def test_sigterm_to_cv_ends_its_local_jobs_and_resume_finishes(tiny_shards, tmp_path):
    """Two local folds run (2 controllers, 2 tasks); SIGTERM to `dist-lc cv` alone: it ends them all
    within the bound, exits 143 with one line, leaves no process; --resume runs both folds again."""
    cv_dir, tag = tmp_path / "cv", str(tmp_path)
    args = [*tiny(tiny_shards, "launcher.tasks_per_node=1", "launcher.max_parallel=2"), "--out", str(cv_dir),
            "--executor", "local"]
    proc = _cv_started(args, tag, [cv_dir / "fold0", cv_dir / "fold1"])
    assert len(tagged_processes(tag)) >= 5   # the launcher, 2 controllers, 2 tasks
    elapsed, err = _stopped(proc, signal.SIGTERM)
    assert proc.returncode == 143 and elapsed < STOP_BOUND_S, (elapsed, err[-3000:])
    assert err.strip().splitlines()[-1].startswith("cv: stopped by SIGTERM; 2 local job(s) ended: dist-lc cv --out ")
    assert not tagged_processes(tag, within_s=2)
    assert not any((cv_dir / f"fold{k}" / "done.json").exists() for k in (0, 1))

    again = run_cv(["--out", str(cv_dir), "--resume"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 job(s) to run" in again.stderr


def test_ctrl_c_in_a_terminal_ends_cv_and_its_local_jobs_in_one_line(tiny_shards, tmp_path):
    """A terminal sends SIGINT to its whole foreground group: the local jobs' controllers, in sessions
    of their own, hear it from the launcher alone (in its group, each died printing a traceback)."""
    cv_dir, tag = tmp_path / "cv", str(tmp_path)
    args = [*tiny(tiny_shards, "launcher.tasks_per_node=1", "launcher.max_parallel=2"), "--out", str(cv_dir),
            "--executor", "local"]
    proc = _cv_started(args, tag, [cv_dir / "fold0", cv_dir / "fold1"])
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)   # its session's group, as a terminal's Ctrl-C
    _, err = proc.communicate(timeout=STOP_BOUND_S + 30)
    assert proc.returncode == -signal.SIGINT and time.monotonic() - started < STOP_BOUND_S, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("cv: stopped by SIGINT; 2 local job(s) ended: dist-lc cv --out ")
    assert not tagged_processes(tag, within_s=2)


def test_ranks_of_a_local_job_whose_controller_is_killed_end_themselves(tiny_shards, tmp_path):
    """Orphaned, they would train on unwatched while the launcher gives their slot to the next fold."""
    import json

    cv_dir, tag = tmp_path / "cv", str(tmp_path)
    args = [*tiny(tiny_shards, "launcher.tasks_per_node=1", "cv.folds=[0]", "train.epochs=50"), "--out",
            str(cv_dir), "--executor", "local"]
    proc = _cv_started(args, tag, [cv_dir / "fold0"])
    try:
        controller = int(json.loads((cv_dir / "jobs.json").read_text())["jobs"][0]["job_id"])
        os.kill(controller, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any("submitit.core._submit" in line for line in tagged_processes(tag)):
            assert time.monotonic() < deadline, tagged_processes(tag)
            time.sleep(0.5)
        notes = "".join(p.read_text() for p in (cv_dir / "fold0" / ".failures").glob("rank*"))
        assert f"the launcher of this rank (pid {controller}) is gone" in notes, notes
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=STOP_BOUND_S + 30)
    assert not tagged_processes(tag, within_s=5)


def _tagged_outside_slurm(tag: str) -> list[str]:
    """Command lines of live processes with DIST_LC_TEST_TAG=tag that no Slurm job started."""
    needle, out = f"DIST_LC_TEST_TAG={tag}\0".encode(), []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes()
            if needle in environ and b"SLURM_JOB_ID=" not in environ and \
                    open(proc / "stat").read().rsplit(")", 1)[1].split()[0] not in "ZX":
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return out


@pytest.mark.slurm
def test_sigterm_to_cv_leaves_its_slurm_jobs_running_and_resume_watches_them(tiny_shards, tmp_path):
    """As Ctrl-C does: the Slurm jobs go on without their launcher; --resume watches them (no fold
    submitted twice) and reports."""
    import json

    from dist_lc.cv.executors import ACTIVE_SLURM_STATES, slurm_states

    require_slurm()

    cv_dir, tag = tmp_path / "cv", str(tmp_path)
    # enough epochs that the jobs outlive the stopped launcher and the resumed one's start, also on a
    # loaded machine (3 once ended first, and the resume then had nothing to watch)
    args = [*tiny(tiny_shards, "train.epochs=12", "launcher.tasks_per_node=1"), "--out", str(cv_dir),
            "--executor", "slurm"]
    proc = _cv_started(args, tag, [cv_dir / "fold0", cv_dir / "fold1"], timeout_s=180)
    ids = [r["job_id"] for r in json.loads((cv_dir / "jobs.json").read_text())["jobs"]]
    try:
        elapsed, err = _stopped(proc, signal.SIGTERM)
        assert proc.returncode == 143 and elapsed < STOP_BOUND_S, (elapsed, err[-3000:])
        assert err.strip().splitlines()[-1].startswith("cv: stopped by SIGTERM; 2 Slurm job(s) go on: ")
        listed = slurm_states(ids) or {}
        assert all(listed.get(i) in ACTIVE_SLURM_STATES or (cv_dir / f"fold{k}" / "done.json").exists()
                   for k, i in enumerate(ids)), listed
        assert not _tagged_outside_slurm(tag)

        again = run_cv(["--out", str(cv_dir), "--resume"], timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "still running as job" in again.stderr
        assert len(json.loads((cv_dir / "jobs.json").read_text())["jobs"]) == 2   # none resubmitted
    finally:
        for job in ids:
            scancel(job)


@pytest.mark.parametrize("nth", [1, 40])
def test_a_killed_shard_reader_ends_pack_in_one_line_with_nothing_kept(sample_root, tmp_path, nth):
    """A reader process of `lc-shard pack` killed (as by the out-of-memory killer) at its first or a
    later tile: pack exits 1 in one line within seconds, keeping no shard and no manifest (a
    multiprocessing.Pool would wait for the dead worker's result for ever)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "shard_tools", "pack", "--src", str(sample_root), "--out", str(out),
                           "--workers", "2", "--samples-per-shard", "16"], cwd=REPO,
                          env=env(**fault(f"kill-reader nth={nth} marker={tmp_path / 'killed'}")),
                          capture_output=True, text=True, timeout=120)
    assert (tmp_path / "killed").exists()   # the fault fired
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: a reader process was killed") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
