"""Which signals the stop handlers take (dist_lc/stopping.py and its users): one the process was
started ignoring stays ignored (``nohup`` and SIGHUP), save SIGINT, which the programs it starts must
not inherit as ignored (SIGINT cancels a local CV job's tasks). Each test sets the dispositions of
this process, as a parent would have left them, and puts them back after."""
from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from dist_lc.cv.launch import StopRequests
from dist_lc.stopping import StopSignals

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2)


@pytest.fixture
def dispositions():
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def ignored_by_a_started_program(sig: int) -> bool:
    """Whether a program started now begins with ``sig`` ignored (the SigIgn mask of its /proc status)."""
    status = subprocess.run(["grep", "^SigIgn:", "/proc/self/status"], capture_output=True, text=True,
                            check=True, timeout=30).stdout
    return bool(int(status.split()[1], 16) >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=lambda sig: sig.name)
def test_a_stop_signal_the_launcher_was_started_ignoring_stays_ignored(dispositions, sig):
    """`nohup dist-lc cv ... &`, then the terminal closes: the launcher and its jobs go on."""
    signal.signal(sig, signal.SIG_IGN)
    with StopRequests() as stops:
        assert signal.getsignal(sig) is signal.SIG_IGN
        assert ignored_by_a_started_program(sig)   # its jobs ignore it too, as nohup asked
        signal.raise_signal(sig)
        assert stops.signum is None
    assert signal.getsignal(sig) is signal.SIG_IGN


def test_an_ignored_sigint_is_dropped_by_the_launcher_and_not_passed_on_to_what_it_starts(dispositions):
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # a launcher started in the background by a script
    assert ignored_by_a_started_program(signal.SIGINT)
    with StopRequests() as stops:
        assert not ignored_by_a_started_program(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert stops.signum is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_training_keeps_an_ignored_sigterm_ignored_and_takes_sigusr2(dispositions):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    with StopSignals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert not stop.set and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        signal.raise_signal(signal.SIGUSR2)
        assert stop.set
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


FAREWELL = """
import os, signal, sys, time
from dist_lc.stopping import StopSignals
from lc_common.errors import print_error
with StopSignals() as stop:
    stop.say_on_termination("x.tar: bad shard")
if sys.argv[1] == "said":
    print_error("x.tar: bad shard")
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("not ended")
"""


@pytest.mark.parametrize("before", ["tearing down", "said"])
def test_a_rank_ended_by_its_launcher_after_a_failure_still_writes_its_error_line_once(before):
    """The launcher ends the other ranks of a failed job with SIGTERM, maybe while this one still tears
    down its loader and process group after its error: the line comes out, once, and the signal
    still ends the process."""
    proc = subprocess.run([sys.executable, "-c", FAREWELL, before], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM and "not ended" not in proc.stdout
    assert proc.stderr.splitlines() == ["error: x.tar: bad shard"]
