"""``dist-lc tune``: what a later launch finds in its folder. A resumed study draws parameters it has
not drawn before, a damaged or missing journal is one line naming it, and a filesystem without
locks does not stop the launcher.
"""
from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from dist_lc import cli
from dist_lc.config import load_config, to_dict
from dist_lc.tune import launch, space
from dist_lc.tune.settings import Settings
from dist_lc.tune.study import load_study, load_trials, open_study
from lc_common.errors import InputError

SPACES = {"numeric": "optim.lr: {float: [1.0e-4, 1.0e-2], log: true}\noptim.name: [adam, adamw]\n",
          "categorical": "optim.name: [adam, adamw, rmsprop, adagrad, sgd]\n"}


def settings_of(out: Path, sampler: str, text: str) -> Settings:
    config = to_dict(load_config("configs/smoke.yaml"))
    out.mkdir(parents=True)
    searched = out / "space.yaml"
    searched.write_text(text)
    settings = Settings(out=out, config=config, space=space.load_space(searched, config).to_dict(), folds=[0],
                        executor="local", sampler=sampler, seed=0, pruner="median", pruner_startup=1,
                        pruner_warmup=0, fold_order="sequential", trials=6, parallel=1, steps_per_fold=2)
    settings.save()
    return settings


def launches(out: Path, sampler: str, text: str, count: int = 2, per_launch: int = 3) -> list[dict]:
    """The parameters of the trials that ``count`` launches of the study asked for, in order."""
    settings = settings_of(out, sampler, text)
    for _ in range(count):
        study = open_study(settings)
        for _ in range(per_launch):
            trial = study.ask(settings.search_space.distributions())
            study.tell(trial, 0.5)
    return [t.params for t in load_trials(out)]


@pytest.mark.parametrize("sampler", ["random", "tpe", "qmc"])
def test_a_resumed_study_draws_new_parameters_and_the_same_seed_draws_the_same_ones(tmp_path, sampler):
    drawn = launches(tmp_path / "a", sampler, SPACES["numeric"])
    assert len({p["optim.lr"] for p in drawn}) == 6
    assert launches(tmp_path / "b", sampler, SPACES["numeric"]) == drawn
    names = [p["optim.name"] for p in launches(tmp_path / "c", sampler, SPACES["categorical"])]
    assert names[3:] != names[:3]   # the random stream of the keys drawn at random goes on too


def journal_folder(tmp_path: Path) -> Path:
    out = tmp_path / "tune"
    launches(out, "random", SPACES["numeric"], count=1, per_launch=2)
    (out / "trials").mkdir()
    return out


def refused(capsys, out: Path, problem: str) -> str:
    """The line that both a launch (--resume) and the report print."""
    with pytest.raises(InputError, match=re.escape(problem)):
        open_study(launch.load_settings(out))
    assert cli.main(["tune", "--report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out / 'study.journal'}: ") and problem in err[0], err
    return err[0]


def test_a_journal_cut_short_is_refused_to_a_launcher_with_how_to_recover_and_read_by_the_report(tmp_path, capsys):
    """A launcher would append onto the partial line; the report only reads, and skips it as Optuna
    does (it may be a running launcher's append, half seen over a network filesystem)."""
    out = journal_folder(tmp_path)
    path = out / "study.journal"
    whole = path.read_bytes()
    cut = b'{"op_code":6,"worker_id":"x","trial_id":1,"sta'
    path.write_bytes(whole + cut)
    problem = "its last line is cut short (46 bytes; a launcher killed while writing it)"
    with pytest.raises(InputError, match=re.escape(problem)) as refusal:
        open_study(launch.load_settings(out))
    assert str(refusal.value).endswith(f"remove that partial line (truncate -s -46 {path}) and run again")
    assert cli.main(["tune", "--report", str(out)]) == 0
    assert "error" not in capsys.readouterr().err
    assert len(load_study(out).trials) == 2
    assert path.read_bytes() == whole + cut
    path.write_bytes(whole)   # the recovery the message gives
    open_study(launch.load_settings(out))


def test_a_missing_or_unreadable_journal_is_one_line_naming_it(tmp_path, capsys):
    out = journal_folder(tmp_path)
    path = out / "study.journal"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{not json\n" + b"".join(lines[1:]))
    refused(capsys, out, "unreadable study journal (JSONDecodeError")
    path.write_bytes(b"")
    refused(capsys, out, "empty beside tune.json; it is the study's only record of its trials")
    path.unlink()
    refused(capsys, out, "missing beside tune.json; it is the study's only record of its trials")
    assert not path.exists()   # nothing created in its place


def test_a_filesystem_without_locks_runs_the_launcher_unguarded_and_a_held_folder_is_refused(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("fcntl.flock", no_locks)   # lc_common.locks, which holding() uses
    with launch.holding(tmp_path):
        pass

    def held(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr("fcntl.flock", held)
    with pytest.raises(InputError, match="another dist-lc tune .* is running this study"):
        with launch.holding(tmp_path):
            pass
