"""Errors meant for the person running a stage: the CLI prints them as one line, no traceback."""


class DreamdiffError(Exception):
    """Bad input or an impossible request; the message names the field and what was expected."""
