"""Stop requests (SIGUSR2 from submitit or an sbatch script before a time limit or on preemption,
SIGTERM from Slurm or a user): the first one sets a flag that the ranks agree on at the next optimizer
step; a second SIGTERM ends the process at once. The previous handlers are back when the block ends,
so a process that leaves training on an error dies of the next SIGTERM as usual, once it has written
its error line (:meth:`StopSignals.say_on_termination`).

A signal the process was started ignoring stays ignored (``nohup`` asks for SIGHUP to be; whoever
started the process chose so), save SIGINT: see :meth:`SignalHandlers.handler_for`."""
from __future__ import annotations

import contextlib
import signal

from lc_common.errors import print_error_once

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


def _ignore(signum, frame) -> None:
    """Ignores a signal as SIG_IGN would, without being passed on to started programs."""


class SignalHandlers:
    """While open, ``self._handler`` handles each of ``SIGNALS`` that is not ignored; the previous
    handlers are back on exit. Outside the main thread Python cannot install handlers: the signals
    keep theirs."""
    SIGNALS: tuple = ()

    def __enter__(self):
        self._previous = {}
        for sig in self.SIGNALS:
            handler = self.handler_for(sig)
            if handler is None:
                continue
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (some launchers): no handler
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def handler_for(self, sig: int):
        """The handler to install for ``sig`` while open, None to leave it as it is. An ignored
        signal stays ignored. An ignored SIGINT is ignored by a Python handler instead of SIG_IGN:
        a started program inherits SIG_IGN but not a handler (reset to the default by exec), and
        SIGINT is what cancels a local CV job, whose tasks must not ignore it."""
        if signal.getsignal(sig) is not signal.SIG_IGN:
            return self._handler
        return _ignore if sig == signal.SIGINT else None

    def _handler(self, signum, frame) -> None:
        raise NotImplementedError

    _holding = 0   # inside held(): a handler that raises only notes the signal

    @contextlib.contextmanager
    def held(self):
        """A block that a signal must not cut short (a collective, a write, a clean-up): the handler
        sees ``self._holding`` and only notes the signal; :meth:`_released` runs when the outermost
        such block ends."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not self._holding:
            self._released()

    def _released(self) -> None:
        """What a signal noted inside ``held()`` does once the block ends: nothing here."""


class StopSignals(SignalHandlers):
    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.set = False
        self._previous: dict = {}
        self._farewell: str | None = None

    def say_on_termination(self, text: str) -> None:
        """This process is ending with ``text`` as its error: from now until it exits, a SIGTERM
        (its launcher ending the ranks of a failed job, maybe while this one still tears down its
        loader and process group) writes that line before the default action, instead of killing the
        process before it has said why."""
        self._farewell = text

    def __exit__(self, *exc) -> bool:
        super().__exit__(*exc)
        if self._farewell is not None:
            farewell = self._farewell

            def say_then_end(signum, frame):
                print_error_once(farewell)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

            with contextlib.suppress(ValueError):   # not the main thread: the default action stays
                signal.signal(signal.SIGTERM, say_then_end)
        return False

    def _handler(self, signum, frame) -> None:
        if self.set and signum == signal.SIGTERM:  # asked twice: the default action (termination), now
            self.__exit__()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self.set = True
