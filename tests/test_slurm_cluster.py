"""The local one-node Slurm cluster (slurm/local-cluster.sh) runs real multi-task jobs.

Needs `bash slurm/local-cluster.sh start`; skipped without it, except under CI=true or
DIST_LC_REQUIRE_SLURM=1 where a missing cluster fails.
"""
from __future__ import annotations

import subprocess
import uuid

import pytest

import slurm_util
from slurm_util import CLUSTER_SCRIPT, require_slurm, sbatch, scancel, slurm_executor, wait_job, wait_submitit


@pytest.fixture
def slurm_node() -> str:
    require_slurm()
    return slurm_util.node_name()


@pytest.mark.slurm
def test_status_reports_running_cluster(slurm_node):
    p = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    assert slurm_node in p.stdout


@pytest.mark.slurm
def test_sbatch_wait_two_tasks(slurm_node, tmp_path):
    name = f"dlc-test-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "out.txt"
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "srun -n2 bash -c 'echo task=$SLURM_PROCID of=$SLURM_NTASKS host=$(hostname -s)'\n"
    )
    try:
        p = subprocess.run(
            ["sbatch", "--wait", "-n", "2", "-J", name, "-o", str(out), "--time=2", str(script)],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", name], timeout=10)
        pytest.fail("sbatch --wait of a trivial 2-task job took more than 30 s")
    assert p.returncode == 0, f"sbatch rc {p.returncode}: {p.stdout}{p.stderr}\n{out.read_text() if out.exists() else ''}"
    lines = sorted(out.read_text().split())
    # both tasks ran, on this node
    assert [f"task={i}" for i in (0, 1)] == sorted(t for t in lines if t.startswith("task="))
    assert lines.count("of=2") == 2
    assert lines.count(f"host={slurm_node}") == 2


@pytest.mark.slurm
def test_oversized_request_fails_at_submit(slurm_node):
    # EnforcePartLimits=ALL: a request larger than the node fails now instead of pending forever.
    p = subprocess.run(
        ["sbatch", "-n", "512", "--wrap", "true"], capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL,
    )
    if p.returncode == 0:  # should not happen; do not leave it pending
        scancel(p.stdout.split()[-1])
    assert p.returncode != 0
    assert "More processors requested than permitted" in p.stderr


@pytest.mark.slurm
def test_wait_job_deadline_and_cancel(slurm_node):
    job_id = sbatch(["-n", "1", "--time=2", "-J", "dlc-test-sleep", "--wrap", "sleep 60", "-o", "/dev/null"])
    try:
        with pytest.raises(TimeoutError):
            wait_job(job_id, timeout_s=1.0)
    finally:
        scancel(job_id)
    assert wait_job(job_id, timeout_s=20) == "CANCELLED"


@pytest.mark.slurm
def test_wait_job_reports_failure(slurm_node):
    job_id = sbatch(["-n", "1", "--time=2", "-J", "dlc-test-fail", "--wrap", "exit 3", "-o", "/dev/null"])
    assert wait_job(job_id, timeout_s=20) == "FAILED"


@pytest.mark.slurm
@pytest.mark.parametrize("ntasks", [2, 4])  # 4 ranks fit: the cluster declares max(nproc, 4) CPUs
def test_submitit_multi_task_gloo_all_reduce(slurm_node, tmp_path, ntasks):
    def ddp_sum():
        # defined inside the test so cloudpickle ships it by value (the test module is not importable
        # in the job); imports inside for the same reason
        import os

        import submitit
        import torch
        import torch.distributed as dist

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        dist.init_process_group(backend="gloo", init_method="env://")
        try:
            t = torch.tensor([float(env.rank + 1)])
            dist.all_reduce(t)
            return {
                "rank": dist.get_rank(),
                "world": dist.get_world_size(),
                "sum": t.item(),
                "master": os.environ["MASTER_ADDR"],
                "local_rank": env.local_rank,
            }
        finally:
            dist.destroy_process_group()

    ex = slurm_executor(tmp_path / "submitit", nodes=1, tasks_per_node=ntasks, cpus_per_task=1)
    job = ex.submit(ddp_sum)
    results = wait_submitit(job, timeout_s=60)
    assert [r["rank"] for r in results] == list(range(ntasks))
    assert [r["local_rank"] for r in results] == list(range(ntasks))
    expected = ntasks * (ntasks + 1) / 2
    assert all(r["world"] == ntasks and r["sum"] == expected for r in results), results
    assert {r["master"] for r in results} == {slurm_node}


@pytest.mark.slurm
def test_wait_submitit_does_not_hang_on_killed_job(slurm_node, tmp_path):
    """Without accounting, a job killed before writing its pickle would hang job.result() forever."""

    def die_hard():
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    ex = slurm_executor(tmp_path / "submitit", tasks_per_node=1, cpus_per_task=1)
    job = ex.submit(die_hard)
    with pytest.raises(RuntimeError, match="without result pickles"):
        wait_submitit(job, timeout_s=60, grace_s=3)


def test_require_slurm_fails_under_ci(monkeypatch):
    """Without a cluster, CI=true / DIST_LC_REQUIRE_SLURM=1 turn the skip into a failure."""
    monkeypatch.setattr(slurm_util, "slurm_problem", lambda: "no cluster (simulated)")
    monkeypatch.delenv("DIST_LC_REQUIRE_SLURM", raising=False)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        slurm_util.require_slurm()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        slurm_util.require_slurm()
    monkeypatch.delenv("CI")
    monkeypatch.setenv("DIST_LC_REQUIRE_SLURM", "1")
    with pytest.raises(pytest.fail.Exception):
        slurm_util.require_slurm()
