"""``dist-lc cv-array prepare|fold``: the two steps of ``slurm/cv_array.sbatch``.

``prepare`` (the batch script, once per array task and attempt) writes the CV folder's ``cv.json``
for a one-point CV, or checks that an existing one holds the same config; ``fold`` (every srun
task) trains and predicts the array task's fold. The folder is then an ordinary CV folder:
``dist-lc report`` and ``dist-lc cv --out DIR --resume`` work on it.
"""
from __future__ import annotations

import sys
from pathlib import Path

from .plan import prepare_array


def run(args) -> int:
    if args.step == "prepare":
        prepare_array(args.config, args.set, Path(args.cv_dir))
        return 0
    from .fold import run_array_fold

    result = run_array_fold(Path(args.cv_dir), args.fold)
    if result["status"] == "stopped":  # the batch script requeues itself after a USR2
        print(f"stopped by SIG{result['signal']} after epoch {result['epochs_done']}", file=sys.stderr)
    return 0
