"""The neutral layer both packages share: atomic writes and their failures."""
import errno
import json

import pandas as pd
import pytest

from lc_common.atomic import write_atomic, write_csv_atomic, write_json_atomic
from lc_common.errors import InputError, WriteError, print_error, said


def test_writers_take_path_first_and_replace_whole(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_csv_atomic(tmp_path / "a.csv", pd.DataFrame({"x": [1, 2]}))
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "a.csv").read_text() == "x\n1\n2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.json"]   # no temporary left


def test_a_failed_write_names_the_path_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"old": True})

    def full_disk(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError) as caught:
        write_atomic(target, full_disk)
    assert str(caught.value) == f"{target}: cannot write: No space left on device"
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_vanished_folder_is_a_write_error(tmp_path):
    with pytest.raises(WriteError, match="gone/x.json: cannot write: No such file or directory"):
        write_json_atomic(tmp_path / "gone" / "x.json", {})


@pytest.mark.parametrize("content, problem", [
    ("{", "unreadable job list (JSONDecodeError"),
    ("[1, 2]", "unreadable job list (ValueError: not a JSON object but list)"),
    ('{"jobs": [{"point": "a"}]}', "unreadable job list (TypeError"),
    ('{"other": 1}', "unreadable job list (KeyError"),
    ('{"jobs": [{"point": "a", "fold": 0, "executor": "local", "job_id": "7", "stderr": "e", "result": "r", '
     '"submitted": "t", "tasks": "2"}]}', "unreadable job list (TypeError: job '7' of fold 0: a field of the wrong"),
    (b"\xff\xfe", "unreadable job list (UnicodeDecodeError"),
])
def test_a_damaged_record_is_one_line_naming_it(tmp_path, content, problem):
    from dist_lc.cv.plan import JOBS, read_submissions

    path = tmp_path / JOBS
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as info:
        read_submissions(tmp_path)
    assert str(info.value).startswith(f"{path}: {problem}") and "\n" not in str(info.value), info.value


@pytest.mark.parametrize("content, problem", [
    ("epoch,train_loss\n1,0.5\n2,abc\n", "line 3, train_loss: 'abc' is not a number"),
    ("epoch,train_loss\n1,0.5,7\n", "line 2 has more fields than the header"),
    ("epoch,train_loss\n1\n", "line 2 has fewer fields than the header"),
    ("train_loss\n0.5\n", "KeyError: 'epoch'"),
    (b"epoch\n\xff\n", "UnicodeDecodeError"),
])
def test_a_damaged_metrics_file_is_one_line_naming_it(tmp_path, content, problem):
    from dist_lc.run_log import read_metrics

    (tmp_path / "metrics.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as info:
        read_metrics(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / 'metrics.csv'}: unreadable metrics") and problem in str(info.value)


def test_metrics_with_skipped_validations_read_as_written(tmp_path):
    from dist_lc.run_log import read_metrics

    (tmp_path / "metrics.csv").write_text("epoch,train_loss,val_kl\n1,0.5,\n2,0.4,nan\n")
    assert read_metrics(tmp_path) == [{"epoch": "1", "train_loss": "0.5", "val_kl": ""},
                                      {"epoch": "2", "train_loss": "0.4", "val_kl": "nan"}]


def test_an_error_line_is_one_write(monkeypatch):
    """Ranks share one unbuffered stream: a line written in parts could interleave with a peer's."""
    writes = []

    class Stream:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr("sys.stderr", Stream())
    print_error(InputError("a.tif: truncated"))
    assert writes == ["error: a.tif: truncated\n"]


def test_what_an_exception_said_is_one_line_even_when_it_said_nothing():
    assert said(RuntimeError("CUDA error: out of memory\n  more\n")) == "CUDA error: out of memory"
    assert said("Traceback\n  ...\nValueError:  a   b \n\n", last=True) == "ValueError: a b"
    assert said(RuntimeError("x" * 500), limit=10) == "x" * 10
    # an empty message (torch.load of a 0-byte file raises EOFError()) has no first line to index
    assert said(EOFError()) == "EOFError"
    assert said(" \n ") == "no message"
    assert said(RuntimeError(""), empty="(nothing)") == "(nothing)"


def test_a_cv_plan_without_a_grid_point_is_one_line_naming_it(tmp_path):
    from dist_lc.cv.plan import PLAN, load_plan

    (tmp_path / PLAN).write_text('{"points": [], "folds": [0], "executor": "local"}')
    with pytest.raises(InputError, match=r"cv.json: unreadable CV plan \(ValueError: no grid point\)"):
        load_plan(tmp_path)


def test_a_run_starting_while_its_lock_is_probed_is_never_refused(tmp_path):
    """``holder`` takes a free lock for a moment to tell that it is free; a run that starts in that
    moment waits for it instead of being refused (a stress loop: another process probes all along)."""
    import subprocess
    import sys

    from lc_common import locks

    path = tmp_path / ".lock"
    path.touch()
    probe = subprocess.Popen([sys.executable, "-c", "import sys\nfrom lc_common.locks import holder\n"
                              "print('probing', flush=True)\nwhile True: holder(sys.argv[1])", str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout.readline() == "probing\n"
        for _ in range(300):
            with locks.held(path, "refused while free ({holder})"):
                pass
    finally:
        probe.kill()
        probe.wait()


def waiting_for_the_lock(monkeypatch):
    """An event set once a thread other than the main one has opened a lock file and tries to lock it
    (it then waits: held retries for 30 s here, so a loaded machine cannot make it give up)."""
    import threading

    from lc_common import locks

    waiting, real = threading.Event(), locks._lock_now_or_soon

    def tried(lock):
        if threading.current_thread() is not threading.main_thread():
            waiting.set()
        return real(lock)

    monkeypatch.setattr(locks, "_lock_now_or_soon", tried)
    monkeypatch.setattr(locks, "PROBE_WAIT_S", 30.0)
    return waiting


def test_a_run_waiting_for_a_transient_lock_takes_the_file_that_replaces_it(tmp_path, monkeypatch):
    """A transient lock's holder removes the file, then lets it go: a run that opened the file while it
    was held, and waited, must not hold the removed file (a third run would take the new one too)."""
    import threading

    from lc_common import locks

    path, seen, waiting = tmp_path / ".lock", {}, waiting_for_the_lock(monkeypatch)

    def second():
        with locks.held(path, "refused ({holder})", transient=True):
            seen["the file it holds is the folder's"] = path.exists()

    with locks.held(path, "refused ({holder})", transient=True):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(30)
    thread.join(60)
    assert seen == {"the file it holds is the folder's": True}


def test_a_run_waiting_for_a_folder_whose_first_run_fails_is_refused_or_takes_it(tmp_path, monkeypatch):
    """The first run fails and removes the output folder it made as the second waits for its lock:
    the second is refused in one line saying so, or holds the folder; never a stray error."""
    import threading

    from lc_common import locks

    folder, seen, waiting = tmp_path / "out", [], waiting_for_the_lock(monkeypatch)

    def second():
        try:
            with locks.held(folder / ".lock", "in use ({holder})"):
                seen.append(("held", folder.is_dir()))
        except InputError as exc:
            seen.append(("refused", str(exc).startswith(f"{folder}: removed by the run this one waited for (pid ")))

    with pytest.raises(RuntimeError):
        with locks.claimed(folder, "in use ({holder})", ".lock"):
            thread = threading.Thread(target=second)
            thread.start()
            assert waiting.wait(30)
            raise RuntimeError("the first run fails")
    thread.join(60)
    assert seen in ([("held", True)], [("refused", True)])
