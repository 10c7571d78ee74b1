"""Errors that a user can fix. The CLI prints them as one line and exits non-zero."""


class LogoError(Exception):
    """A user-facing error: the message says what was wrong and what to do."""


class AdapterError(LogoError):
    """An adapter (or the adapter library) is unusable."""


class ModelLoadError(LogoError):
    """The base model could not be loaded."""
