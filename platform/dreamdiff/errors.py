"""Errors meant for the person running a stage: the CLI prints them as one line, no traceback.

`DreamdiffError` is bad input (a field, a config, a file the user gave or a run left behind): the CLI exits 2.
`StageFailedError` is a failure of the work itself (e.g. a training worker died): the CLI exits 1.
`unreadable_file` builds the one-line answer for a file that cannot be read (truncated, corrupt, not what it
should be): it names the file, what it should hold and what to do.
"""

from __future__ import annotations

from pathlib import Path


class DreamdiffError(Exception):
    """Bad input or an impossible request; the message names the field (or file) and what was expected."""

    exit_code = 2  # the CLI's exit status: bad input


class StageFailedError(DreamdiffError):
    """The stage's own work failed (not its input): the message says which stage, what is kept and how to go on."""

    exit_code = 1  # the CLI's exit status: internal failure


def first_line(err: BaseException) -> str:
    """An exception as `Type: first line of its message` (library messages can span many lines)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def unreadable_file(path: str | Path, what: str, err: BaseException, remedy: str) -> DreamdiffError:
    """The error for `path`, which should hold `what` but cannot be read (`err`); `remedy` says what to do."""
    return DreamdiffError(f"{path}: cannot read it as {what} ({first_line(err)}); it is truncated or corrupt: {remedy}")
