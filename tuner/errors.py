"""One small error hierarchy. The CLI catches `TunerError` once and prints one line."""

from __future__ import annotations


class TunerError(Exception):
    """A failure the user can act on. `exit_code` is what the CLI returns."""

    exit_code = 1


class ConfigError(TunerError):
    """Bad input: a params file, a study file, a flag. Exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        where = ""
        if file:
            where += f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(where + message)
        self.file = file
        self.key = key


class DataError(TunerError):
    """A dataset that cannot be found or downloaded (exit 1), or a malformed data file (exit 2)."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class DivergedError(TunerError):
    """Training produced a non-finite loss. Exit code 1."""


class CheckpointError(TunerError):
    """A checkpoint that is missing, corrupt, tampered with, or for other params. Exit code 1."""


class StorageError(TunerError):
    """The study database is unreachable or refuses an operation. Exit code 1."""


class StudyNotFoundError(TunerError):
    """A study name that is not in the storage. Exit code 2 (a usage error)."""

    exit_code = 2


_URL_PASSWORD = __import__("re").compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):(?P<pw>[^@\s/]+)@")


def redact(text: str) -> str:
    """Replace the password of every URL in `text` with `***` (`scheme://user:***@host`)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:***@", text)
