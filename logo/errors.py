"""Errors that a user can fix. The CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable


class LogoError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class AdapterError(LogoError):
    """An adapter (or the adapter library) is unusable."""


class ModelLoadError(LogoError):
    """The base model could not be loaded."""


def one_line(text: object) -> str:
    """``text`` (an error, or another library's error message) on one line: runs of whitespace, newlines
    included, become one space, and a trailing period goes, so that it can be quoted inside a sentence."""
    return " ".join(str(text).split()).rstrip(".")


def exit_on_error(run: Callable[[], object]) -> None:
    """Run a command line's ``run``; a :class:`LogoError` (a mistake the user can fix) is printed as one line,
    ``error: ...``, and the process exits with status 2 (the ``logo`` command and lm-eval's, with ``logo``)."""
    try:
        run()
    except LogoError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def json_kind(value) -> str:
    """A JSON value as an error message shows it: its JSON type and (the start of) the value."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    text = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} {text[:40]}{'...' if len(text) > 40 else ''}"
