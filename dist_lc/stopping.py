"""Stop requests (SIGUSR2 from submitit or an sbatch script before a time limit or on preemption,
SIGTERM from Slurm or a user): the first one sets a flag that the ranks agree on at the next optimizer
step; a second SIGTERM ends the process at once. The previous handlers are back when the block ends,
so a process that leaves training on an error dies of the next SIGTERM as usual."""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class SignalHandlers:
    """While open, ``self._handler`` handles each of ``SIGNALS``; the previous handlers are back on
    exit. Outside the main thread Python cannot install handlers: the signals keep theirs."""
    SIGNALS: tuple = ()

    def __enter__(self):
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (some launchers): no handler
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handler(self, signum, frame) -> None:
        raise NotImplementedError


class StopSignals(SignalHandlers):
    SIGNALS = STOP_SIGNALS

    def __init__(self):
        self.set = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.set and signum == signal.SIGTERM:  # asked twice: the default action (termination), now
            self.__exit__()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)
        self.set = True
