"""Errors a command reports as one line (no traceback), with the fix in the message."""


class CommandError(Exception):
    """An expected failure: printed as one line, exit status 1."""
