"""Cross-validation (and grids) as one multi-task DDP job per (grid point × fold).

Imports run one way, from the leaf up:

- :mod:`.plan`: what a CV folder holds (its plan, its file names) and how a plan is built; no torch.
- :mod:`.fold`: what runs inside a job: train, predict, write ``done.json``; stops and requeues.
- :mod:`.executors`: submitit and Slurm: submitting jobs and telling their state.
- :mod:`.launch`: ``dist-lc cv``: check everything, submit, watch, report.
- :mod:`.array`: ``dist-lc cv-array``, the steps of ``slurm/cv_array.sbatch``.
- :mod:`.report`: ``dist-lc report``: reads a CV folder (no job, no trainer, no submitit).
"""
