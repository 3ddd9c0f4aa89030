"""The error types every entry point turns into one ``error:`` line, and a parser that reports bad
options the same way."""
from __future__ import annotations

import argparse
import errno as _errno
import os
import signal
import sys

WORKER_PREFIX = "Caught InputError in DataLoader worker"


def one_line(text) -> str:
    """An exception's text on one line (error messages are one line each)."""
    return " ".join(str(text).split())


def said(what, *, last: bool = False, limit: int = 200, empty: str | None = None) -> str:
    """One line of what an exception (or a program's output) said: its first non-blank line, or its
    last (``last=True``: a traceback or sbatch ends with the point), cut to ``limit`` characters.
    ``empty`` stands for a text with nothing in it (default: the exception's type, or "no message")."""
    lines = [line.strip() for line in str(what).splitlines() if line.strip()]
    if not lines:
        return empty if empty is not None else (
            type(what).__name__ if isinstance(what, BaseException) else "no message")
    return one_line(lines[-1] if last else lines[0])[:limit]


def first_sentence(exc: BaseException) -> str:
    """An error whose text is a paragraph (torch's out-of-memory: sizes, then advice on the
    allocator): its first sentence, on one line."""
    return one_line(exc).split(". ")[0][:160] or type(exc).__name__


_PRINTED: set[str] = set()   # what print_error has written in this process


def print_error(text) -> None:
    """Write ``error: <text>`` to stderr in one write: the ranks of a job share one stream, often
    unbuffered (PYTHONUNBUFFERED), where print() writes the text and its newline apart and two ranks'
    lines could interleave."""
    _PRINTED.add(str(text))
    sys.stderr.write(f"error: {text}\n")
    sys.stderr.flush()


def print_error_once(text) -> None:
    """:func:`print_error`, unless this process has already written that line."""
    if str(text) not in _PRINTED:
        print_error(text)


class InputError(Exception):
    """Bad input from the user: the message names the file and the problem in one line.

    Command-line entry points catch it, print ``error: <message>`` and exit with status 2.
    Raised inside a DataLoader worker (a corrupt or short shard), it reaches the main process as
    ``InputError(<"Caught InputError in DataLoader worker" + the worker's traceback>)``; the
    original one-line message is kept instead, so the user still reads one line.
    """

    def __init__(self, message: str = ""):
        if message.startswith(WORKER_PREFIX) and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]   # "lc_common.errors.InputError: <message>"
            message = last.split("InputError: ", 1)[-1]
        super().__init__(message)


class WriteError(Exception):
    """An output that could not be written (a full disk, a quota, a read-only or vanished folder).

    Not the user's input, so entry points exit with status 1; the message names the path and the
    errno's meaning in one line. Whatever the write replaces is left as it was.
    """

    def __init__(self, path, exc: OSError):
        code = exc.errno
        meaning = (exc.strerror or (_errno.errorcode.get(code, "") if code else "")) or one_line(exc)
        super().__init__(f"{path}: cannot write: {meaning}")
        self.path, self.errno = str(path), code

    def __reduce__(self):   # raised in a worker process, it travels pickled, without its OSError
        return _rebuilt_write_error, (str(self), self.path, self.errno)

    def naming(self, path) -> "WriteError":
        """The same failure, naming ``path`` (a file first written under another name of its own)."""
        return _rebuilt_write_error(f"{path}{str(self)[len(self.path):]}", str(path), self.errno)


def _rebuilt_write_error(message: str, path: str, code) -> WriteError:
    error = WriteError.__new__(WriteError)
    Exception.__init__(error, message)
    error.path, error.errno = path, code
    return error


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad option reported like every other bad input: one ``error:`` line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


INTERRUPTED = 128 + signal.SIGINT   # what a command returns when Ctrl-C stopped it


def ended_as_told(status: int, argv) -> int:
    """An entry point's exit status, except after Ctrl-C on the command line (``argv`` None): the
    process then ends by SIGINT itself, as a shell expects, so that a loop around the command stops
    too (bash goes on to the next command after one that merely exited 130)."""
    if status == INTERRUPTED and argv is None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return status
