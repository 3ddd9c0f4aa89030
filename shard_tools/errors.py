"""The one error type for bad user input (files, folders, configs)."""


class InputError(Exception):
    """Bad input from the user: the message names the file and the problem in one line.

    Command-line entry points catch it, print ``error: <message>`` and exit with status 2.
    """
