"""The one error type for bad user input (files, folders, configs), and a parser that reports bad
options the same way."""
import argparse

WORKER_PREFIX = "Caught InputError in DataLoader worker"


class InputError(Exception):
    """Bad input from the user: the message names the file and the problem in one line.

    Command-line entry points catch it, print ``error: <message>`` and exit with status 2.
    Raised inside a DataLoader worker (a corrupt or short shard), it reaches the main process as
    ``InputError(<"Caught InputError in DataLoader worker" + the worker's traceback>)``; the
    original one-line message is kept instead, so the user still reads one line.
    """

    def __init__(self, message: str = ""):
        if message.startswith(WORKER_PREFIX) and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]   # "shard_tools.errors.InputError: <message>"
            message = last.split("InputError: ", 1)[-1]
        super().__init__(message)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad option reported like every other bad input: one ``error:`` line, exit 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")
