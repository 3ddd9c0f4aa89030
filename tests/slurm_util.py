"""Helpers for tests that need the local Slurm cluster (``bash slurm/local-cluster.sh start``).

Import from a test module as ``from slurm_util import ...`` (pytest puts ``tests/`` on sys.path).

Rules these helpers enforce (see ../shared/notes/slurm-localhost.md):

* Slurm tests are skipped when no cluster answers, EXCEPT under CI (``CI=true``) or with
  ``DIST_LC_REQUIRE_SLURM=1``, where a missing cluster is a failure: CI must never skip them silently.
* Nothing waits forever. The cluster runs without accounting, so submitit cannot tell a job that
  died without writing its result pickle from a running one (its ``job.result()`` would wait
  forever); ``wait_submitit`` watches the job through squeue/``scontrol show job`` and a deadline.
* Job ids restart at 1 whenever the cluster restarts: always give submitit a fresh folder.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

#: Slurm job states after which a job never runs again. PREEMPTED is left out: with the cluster's
#: PreemptMode=REQUEUE a preempted job goes back to PENDING and runs again (submitit agrees).
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)
USABLE_NODE_STATES = frozenset({"idle", "mixed", "allocated", "completing"})

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"


class SlurmError(RuntimeError):
    """A Slurm client command failed for another reason than an unknown job."""


def _run(args: list[str], timeout_s: float = 10.0) -> tuple[int, str]:
    """Run a Slurm client command; (returncode, stdout+stderr). Never raises, never hangs."""
    try:
        p = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s
        )
    except FileNotFoundError:
        return 127, f"{args[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(args)}: no answer within {timeout_s} s"
    return p.returncode, (p.stdout + p.stderr).strip()


def slurm_required() -> bool:
    """True when a missing cluster must fail tests instead of skipping them."""
    return (
        os.environ.get("CI", "").strip().lower() == "true"
        or os.environ.get("DIST_LC_REQUIRE_SLURM", "").strip() == "1"
    )


def slurm_problem() -> str | None:
    """None if the controller answers `scontrol ping` and sinfo shows a usable node, else why not."""
    if shutil.which("scontrol") is None or shutil.which("sinfo") is None:
        return "Slurm client commands not installed (run: bash slurm/local-cluster.sh start)"
    rc, out = _run(["scontrol", "ping"], timeout_s=10)
    if rc != 0 or "is UP" not in out:
        return f"Slurm controller not answering (scontrol ping: {out!r}); run: bash slurm/local-cluster.sh start"
    rc, out = _run(["sinfo", "-h", "-N", "-o", "%N %T"])
    nodes = [line.split() for line in out.splitlines() if line.strip()]
    if rc != 0 or not nodes:
        return f"sinfo shows no node ({out!r})"
    bad = [f"{n} {s}" for n, s in nodes if s not in USABLE_NODE_STATES]
    if bad:
        return f"Slurm node not usable: {', '.join(sorted(set(bad)))}"
    return None


def slurm_available() -> bool:
    """`scontrol ping` answers UP and sinfo shows a usable node (idle/mixed/allocated/completing)."""
    return slurm_problem() is None


def require_slurm() -> None:
    """Skip the calling test when no cluster is up; fail instead under CI=true or DIST_LC_REQUIRE_SLURM=1."""
    problem = slurm_problem()
    if problem is None:
        return
    if slurm_required():
        pytest.fail(f"Slurm required here (CI=true or DIST_LC_REQUIRE_SLURM=1) but: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture
def slurm() -> str:
    """Fixture: requires the cluster (see require_slurm) and returns the node name.

    Use as ``from slurm_util import slurm  # noqa: F401`` then ``def test_x(slurm, tmp_path): ...``.
    """
    require_slurm()
    return node_name()


def node_name() -> str:
    """The Slurm node's name (sinfo's, else `hostname -s`, which is what local-cluster.sh configures)."""
    if shutil.which("sinfo"):
        rc, out = _run(["sinfo", "-h", "-N", "-o", "%N"])
        if rc == 0 and out.strip():
            return out.split()[0]
    return socket.gethostname().split(".")[0]


def job_info(job_id: int | str) -> dict[str, str] | None:
    """`scontrol show job` as a dict (first record), or None once Slurm no longer knows the job.

    Without accounting a finished job is forgotten MinJobAge (5 s) after it ends.
    Raises SlurmError when the controller does not answer.
    """
    rc, out = _run(["scontrol", "-o", "show", "job", str(job_id)])
    if "Invalid job id" in out:
        return None
    if rc != 0 or not out.strip():
        raise SlurmError(f"scontrol show job {job_id} failed (rc {rc}): {out}")
    info: dict[str, str] = {}
    for token in out.splitlines()[0].split():
        key, sep, value = token.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def job_state(job_id: int | str) -> str | None:
    """The job's state (e.g. RUNNING, COMPLETED), or None if Slurm does not know it (any more).

    Raises SlurmError when the controller does not answer.
    """
    rc, out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"])
    if rc != 0 and "Invalid job id" not in out:
        raise SlurmError(f"squeue -j {job_id} failed (rc {rc}): {out}")
    states = [s for s in out.split() if s.isupper()] if rc == 0 else []
    if states and not all(s in TERMINAL_STATES for s in states):
        return states[0]
    info = job_info(job_id)
    if info is None:
        return states[0] if states else None
    return info.get("JobState")


def wait_job(job_id: int | str, timeout_s: float, poll_s: float = 0.5) -> str:
    """Poll until the job reaches a terminal state and return it (COMPLETED, FAILED, TIMEOUT, ...).

    Raises TimeoutError (with the last state seen) at the deadline, and RuntimeError if Slurm forgets
    the job before any terminal state was seen. A controller that stops answering counts against the
    deadline only. Never waits forever.
    """
    deadline = time.monotonic() + timeout_s
    last: str | None = None
    error = ""
    seen = False
    while True:
        try:
            state = job_state(job_id)
            error = ""
        except SlurmError as exc:  # controller busy or down: only the deadline applies
            error = f"; last client error: {exc}"
        else:
            if state is not None:
                seen, last = True, state
                if state in TERMINAL_STATES:
                    return state
            elif seen:
                raise RuntimeError(f"Slurm forgot job {job_id} (last state {last}) before it was seen to finish")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout_s} s (state: {last}{error})")
        time.sleep(poll_s)


def scancel(job_id: int | str) -> None:
    """Cancel a job, ignoring errors (e.g. already gone)."""
    _run(["scancel", str(job_id)])


def sbatch(args: list[str], timeout_s: float = 30.0) -> int:
    """`sbatch --parsable ARGS` and return the job id (raises RuntimeError with sbatch's message)."""
    rc, out = _run(["sbatch", "--parsable", *args], timeout_s=timeout_s)
    if rc != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed (rc {rc}): {out}")
    return int(out.strip().splitlines()[-1].split(";")[0])


def slurm_executor(folder: str | os.PathLike, **params: Any):
    """A submitit executor bound to Slurm explicitly; `folder` must be fresh (job ids restart at 1).

    `params` go to `update_parameters`; timeout_min defaults to 5, so a stuck job is killed.

    Trap: Slurm sends the --signal warning (submitit: USR2, `slurm_signal_delay_s` = 90 s before the
    limit) as soon as a time-limit check, run about every 30 s, finds less than delay + 30 s left.
    With timeout_min=2 a job got "this job is timed-out" 5 s after it started (rank 0 then left,
    the other ranks hung in gloo). So timeout_min * 60 must exceed the delay + 60 s; refused here.
    """
    import submitit

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"submitit folder {folder} is not empty: job ids restart with the cluster, use a fresh one")
    params.setdefault("timeout_min", 5)
    delay = params.get("slurm_signal_delay_s", 90)
    if params["timeout_min"] * 60 <= delay + 60:
        raise ValueError(
            f"timeout_min={params['timeout_min']} with slurm_signal_delay_s={delay}: Slurm may send the "
            "timeout signal right at the start; use timeout_min*60 > slurm_signal_delay_s + 60"
        )
    ex = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    ex.update_parameters(**params)
    return ex


def wait_submitit(job, timeout_s: float, poll_s: float = 0.5, grace_s: float = 6.0) -> list:
    """Results of every task of a submitit job (``job.results()``), with a deadline.

    Polls ``job.done()`` and the job's Slurm state. If Slurm reports the job finished (or forgets it)
    but the result pickles do not appear within `grace_s`, an error is raised; at the deadline the job
    is cancelled and TimeoutError raised; both carry the tail of its logs. Never waits forever.
    """
    deadline = time.monotonic() + timeout_s
    finished_at: float | None = None
    state: str | None = None
    while not job.done():
        now = time.monotonic()
        try:
            state = job_state(job.job_id)
        except SlurmError as exc:  # controller busy or down: only the deadline applies
            state = f"unknown ({exc})"
        else:
            if state is None or state in TERMINAL_STATES:
                finished_at = finished_at if finished_at is not None else now
            else:  # running, pending, requeued: not finished (again)
                finished_at = None
        if finished_at is not None and now - finished_at > grace_s:
            raise RuntimeError(
                f"submitit job {job.job_id} ended in Slurm (state {state}) without result pickles\n"
                + _submitit_logs(job)
            )
        if now >= deadline:
            scancel(job.job_id)
            raise TimeoutError(
                f"submitit job {job.job_id} not done after {timeout_s} s (Slurm state {state}); cancelled\n"
                + _submitit_logs(job)
            )
        time.sleep(poll_s)
    return job.results()


def _submitit_logs(job, lines: int = 30) -> str:
    parts = []
    for name in ("stderr", "stdout"):
        try:
            text = getattr(job, name)() or ""
        except Exception as exc:  # a log that cannot be read must not hide the real error
            text = f"<unreadable: {exc}>"
        tail = "\n".join(text.splitlines()[-lines:])
        parts.append(f"----- {name} (last {lines} lines) -----\n{tail}")
    return "\n".join(parts)
