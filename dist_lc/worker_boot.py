"""Imported by the loader workers' forkserver (:mod:`dist_lc.loading`) before it forks any worker:
the data path is loaded once, and the forkserver and every worker it forks ignore the stop signals
that Slurm sends to every process of a job step (their rank decides when to stop, and ends them).
Thread pools are sized to one thread before numpy loads: the forkserver runs no work of its own,
and a worker is one core."""
import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

from dist_lc import data  # noqa: E402,F401  (preloaded: a worker then starts without importing torch)
from dist_lc.loading import ignore_stop_signals  # noqa: E402

FORKSERVER_PID = os.getpid()   # the parent every worker watches
ignore_stop_signals()
