"""A write that fails during training (a full disk) at each of an epoch's writes — best.pt, the
metrics row, last.pt — ends every rank with one line naming the path, keeps the traceback in the
run's log, and leaves a run that the same command finishes once the cause is gone."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from test_faults import BOUND_S, EPOCHS, epochs_in, logged_torchrun, rank_logs, recipe
from torchrun_util import REPO, env, fault

pytestmark = pytest.mark.fault
FULL = "cannot write: No space left on device"


def _train(args, extra_env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env(**(extra_env or {})), capture_output=True,
                          text=True, timeout=BOUND_S * 3)


def _finishes_after(run, args) -> None:
    again = _train(args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert epochs_in(run) == list(range(1, EPOCHS + 1))   # the lost row written, none twice
    assert (run / "checkpoints" / "best.pt").is_file()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == EPOCHS


@pytest.mark.parametrize("name, nth", [("best.pt", 1), ("metrics.csv", 2)])
def test_a_full_disk_at_a_write_is_one_line_and_the_rerun_finishes(tiny_shards, tmp_path, name, nth):
    run = tmp_path / "run"
    args = [*recipe(tiny_shards, "data.fold=0"), "--run-dir", str(run)]
    written = ".best.next.pt" if name == "best.pt" else name   # best.pt's name until its epoch's last.pt
    proc = _train(args, fault(f"disk-full file={written} nth={nth} marker={tmp_path / 'fired'}"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {run / ('checkpoints' if name.endswith('.pt') else '') / name}: {FULL}"], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" in (run / "train.log").read_text()
    _finishes_after(run, args)


def test_a_full_disk_at_last_pt_ends_every_rank_with_its_cause(tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = [*recipe(tiny_shards, "data.fold=0", "data.workers=1"), "--run-dir", str(run)]
    proc = logged_torchrun(args, tmp_path / "logs", check=False, timeout=BOUND_S * 2,
                           extra_env=fault(f"disk-full file=last.pt nth=2 marker={tmp_path / 'fired'}"))
    assert proc.returncode != 0
    logs = rank_logs(tmp_path / "logs")
    path = run / "checkpoints" / "last.pt"
    assert f"error: {path}: {FULL}" in logs[0].splitlines(), logs[0][-2000:]
    assert f"error: rank 0 failed first: WriteError: {path}: {FULL}" in logs[1], logs[1][-2000:]
    assert "Traceback" not in logs[0]
    _finishes_after(run, [*recipe(tiny_shards, "data.fold=0", "data.workers=1"), "--run-dir", str(run)])


@pytest.mark.parametrize("name, sets", [("config.yaml", []), ("epoch_001.png", ["train.plot_every=1"])])
def test_a_full_disk_at_rank_0_s_other_writes_ends_every_rank_with_its_cause(tiny_shards, tmp_path, name, sets):
    """The resolved config at the start, a plot after an epoch: written by rank 0 alone, their failure is
    heard by the other ranks at once (they would otherwise wait for rank 0 in the next collective until
    the timeout, under srun or submitit with nothing else to end them)."""
    run = tmp_path / "run"
    args = [*recipe(tiny_shards, "data.fold=0", *sets), "--run-dir", str(run)]
    proc = logged_torchrun(args, tmp_path / "logs", check=False, timeout=BOUND_S * 2,
                           extra_env=fault(f"disk-full file={name} marker={tmp_path / 'fired'}"))
    assert proc.returncode != 0
    logs = rank_logs(tmp_path / "logs")
    path = run / ("plots" if name.endswith(".png") else "") / name
    assert f"error: {path}: {FULL}" in logs[0].splitlines(), logs[0][-2000:]
    assert f"error: rank 0 failed first: WriteError: {path}: {FULL}" in logs[1], logs[1][-2000:]
    assert "Traceback" not in logs[0] and "Traceback" not in logs[1]
