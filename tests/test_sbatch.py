"""slurm/train.sbatch and slurm/cv_array.sbatch run for real on the local Slurm (CPU, gloo, no GPUs):
two srun tasks per job, requeue (Slurm's and the script's own after USR2) resuming from last.pt."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from slurm_util import require_slurm, sbatch, scancel, wait_job
from torchrun_util import REPO

CPU = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"]


def overrides(shards, epochs: int, *extra) -> list[str]:
    return [f"data.shards={shards}", "data.crop=32", "data.workers=0", "model.filters=8", "model.upconv_filters=8",
            f"train.epochs={epochs}", "train.batch_size=8", "train.micro_batch_size=4", "train.precision=fp32",
            "train.plot_every=0", *extra]


def submit(tmp_path, script: str, args: list[str], *options: str, log: str = "job.out") -> tuple[int, Path]:
    job = sbatch([*CPU, "-J", f"dlc-test-{tmp_path.name[:20]}", "-o", str(tmp_path / log), *options,
                  str(REPO / "slurm" / script), *args])
    return job, tmp_path / log


def wait_for(path: Path, job: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            scancel(job)
            pytest.fail(f"{path} not written within {timeout_s} s")
        time.sleep(0.2)


def epochs_of(run_dir: Path) -> list[int]:
    return list(pd.read_csv(run_dir / "metrics.csv")["epoch"])


@pytest.mark.slurm
def test_train_sbatch_wait_trains_with_two_tasks(tiny_shards, tmp_path):
    require_slurm()
    run, log, name = tmp_path / "run", tmp_path / "job.out", f"dlc-test-wait-{time.time_ns()}"
    cmd = ["sbatch", "--wait", *CPU, "-J", name, "-o", str(log), str(REPO / "slurm" / "train.sbatch"),
           "configs/smoke.yaml", str(run), *overrides(tiny_shards, 1)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "-n", name], timeout=30)
        raise
    text = log.read_text()
    assert proc.returncode == 0, proc.stderr + text[-3000:]
    assert "slurm: 2 rank(s) on cpu" in text and "2 task(s)" in text
    assert epochs_of(run) == [1]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1


def train_interrupted(tiny_shards, tmp_path, run, epochs, interrupt: list[str]):
    """train.sbatch for ``epochs`` epochs, ``interrupt + [job id]`` once last.pt exists; waits for COMPLETED."""
    job, log = submit(tmp_path, "train.sbatch", ["configs/smoke.yaml", str(run), *overrides(tiny_shards, epochs)])
    try:
        wait_for(run / "checkpoints" / "last.pt", job)
        subprocess.run([*interrupt, str(job)], check=True, timeout=30)
        assert wait_job(job, timeout_s=240) == "COMPLETED", log.read_text()[-3000:]
    finally:
        scancel(job)
    return log


@pytest.mark.slurm
def test_job_requeued_by_slurm_resumes_from_its_checkpoint(tiny_shards, tmp_path):
    """`scontrol requeue` during epoch 2+ (SIGTERM to the tasks): the rerun resumes from last.pt and finishes."""
    require_slurm()
    run, epochs = tmp_path / "run", 5
    log = train_interrupted(tiny_shards, tmp_path, run, epochs, ["scontrol", "requeue"])
    text = log.read_text()
    assert "attempt 2" in text and "DUE TO JOB REQUEUE" in text
    resumed = int(text.split("resuming after epoch ")[1].split()[0])
    assert 1 <= resumed < epochs
    assert epochs_of(run) == list(range(1, epochs + 1))
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == epochs


@pytest.mark.slurm
def test_usr2_before_the_time_limit_makes_the_script_requeue_itself(tiny_shards, tmp_path):
    """--signal=B:USR2: the trap stops the tasks at a step boundary and requeues; the rerun resumes."""
    require_slurm()
    run, epochs = tmp_path / "run", 5
    log = train_interrupted(tiny_shards, tmp_path, run, epochs, ["scancel", "--batch", "--signal=USR2"])
    text = log.read_text()
    assert "stopping the tasks at a step boundary" in text and "requeueing job" in text
    assert "stop requested during epoch" in text and "resuming after epoch" in text
    assert epochs_of(run) == list(range(1, epochs + 1))


@pytest.mark.slurm
def test_cv_array_trains_the_folds_and_feeds_the_report(tiny_shards, tmp_path):
    require_slurm()
    cv_dir, name = tmp_path / "cv", f"dlc-test-array-{time.time_ns()}"
    cmd = ["sbatch", "--wait", "--array=0,1", *CPU, "-J", name, "-o", str(tmp_path / "array-%a.out"),
           str(REPO / "slurm" / "cv_array.sbatch"), "configs/smoke.yaml", str(cv_dir),
           *overrides(tiny_shards, 1, "cv.folds=[0,1]")]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "-n", name], timeout=30)
        raise
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("array-*.out")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-4000:]
    for k in (0, 1):
        done = json.loads((cv_dir / f"fold{k}" / "done.json").read_text())
        assert done["fold"] == k and done["world_size"] == 2
    proc = subprocess.run([sys.executable, "-m", "dist_lc", "report", str(cv_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((cv_dir / "report.json").read_text())
    assert [f["fold"] for f in report["folds"]] == [0, 1] and (cv_dir / "submission.csv").is_file()


def test_sbatch_scripts_refuse_missing_arguments(tmp_path):
    for script in ("train.sbatch", "cv_array.sbatch"):
        proc = subprocess.run(["bash", str(REPO / "slurm" / script)], capture_output=True, text=True, timeout=30,
                              cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "1"})
        assert proc.returncode == 2 and "error:" in proc.stderr and "CONFIG" in proc.stderr
