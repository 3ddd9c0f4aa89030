"""The submitit callable of one CV job: what a launcher pickles and every task of the job runs.

It imports nothing of training: the launcher that submits jobs (``dist-lc cv``, ``dist-lc tune``,
often on a login node) stays free of torch, and the job's own process imports the fold's work
(:mod:`dist_lc.cv.fold`) when it starts.
"""
from __future__ import annotations

import sys

import submitit


class FoldJob(submitit.helpers.Checkpointable):
    """One grid point × fold: its resolved config, run folder and prediction settings, and the share of
    the machine the local executor gave it (``cpus``, or ``gpu_share`` of each GPU it sees)."""

    def __init__(self, config: dict, run_dir: str, tta: bool = False, cpus: tuple[int, ...] | None = None,
                 gpu_share: float | None = None):
        self.config, self.run_dir, self.tta, self.cpus, self.gpu_share = config, str(run_dir), tta, cpus, gpu_share

    def __call__(self) -> dict:
        from .fold import run_job   # in the job's process only (see the module's docstring)

        return run_job(self)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called on rank 0 only: resubmit this same callable; training resumes from last.pt."""
        print(f"checkpoint: {self.run_dir} will resume from last.pt", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
