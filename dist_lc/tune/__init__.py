"""``dist-lc tune``: hyper-parameter search with Optuna, each trial a cross-validation run as jobs.

The tune folder (``--out DIR``)::

    tune.json              the settings: resolved base config, space, folds, executor, sampler,
                           pruner, fold order, trials, parallel (what --resume continues)
    study.journal          the Optuna study (JournalStorage on a file: no database server, works
                           on a shared filesystem)
    trials/<number>/       one CV folder per trial (cv.json with one point, jobs.json, fold<k>/)
    submitit/launch<n>/    submitit's files, a fresh folder per launch of `dist-lc tune`
    report.md, report.json, best.yaml, plots/

Modules, from the leaf up: :mod:`.space` (SPACE.yaml: read, checked against the config's
declarations, a trial's parameters into config overrides), :mod:`.settings` (tune.json and a
trial's CV folder), :mod:`.study` (storage, samplers, pruners), :mod:`.progress` (a trial's
scores from its folds' files: intermediate values and the objective), :mod:`.scheduler` (trials as
fold jobs through the CV executors: room, pruning, resume), :mod:`.launch` (the command) and
:mod:`.report`.

The choices below are the options' own (not config keys); :mod:`.study` checks at import that it
implements each of them. Kept here, free of imports, so that the command line does not load Optuna.
"""

SAMPLERS = ("tpe", "random", "qmc", "cmaes")
PRUNERS = ("median", "halving", "hyperband", "none")
FOLD_ORDERS = ("sequential", "parallel")
