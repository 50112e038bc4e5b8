"""Errors the CLI turns into one line on stderr and exit status 2."""


class UsageError(Exception):
    """The user asked for something that cannot be done as asked (the message says how to fix it)."""
