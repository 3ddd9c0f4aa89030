"""Imported by the loader workers' forkserver (:mod:`dist_lc.loading`) before it forks any worker:
the data path is loaded once, and the forkserver and every worker it forks ignore the stop signals
that Slurm sends to every process of a job step (their rank decides when to stop, and ends them)."""
from dist_lc import data  # noqa: F401  (preloaded: a worker then starts without importing torch)
from dist_lc.loading import ignore_stop_signals

ignore_stop_signals()
