"""Every error that comes from the user's input, under one base class.

The CLI prints `UserError`s as one `error:` line (exit 2, traceback only with --debug); any
other exception is a bug and keeps its traceback. Each class also derives from the builtin
exception it replaces, so `except ValueError` around older code keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a flag, a config value): the message says where and what to do."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


class DataError(UserError, ValueError):
    """A data file or record is malformed; the message names the file and line."""


class AdapterError(UserError, RuntimeError):
    """An adapter does not fit the model, or its files are missing or broken."""


class ModelLoadError(UserError, RuntimeError):
    """The base model could not be found or read; the message says what to do."""


class MixtureError(UserError, RuntimeError):
    """The built-in mixture's source packages are missing or unreadable."""


class ClusterModelError(UserError, ValueError):
    """A saved cluster model is missing, broken or does not fit."""


class TrainingError(UserError, RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


class TrainingInterrupted(TrainingError):
    def __init__(self, step: int, checkpoint: object):
        self.step = step
        super().__init__(
            f"interrupted at step {step}; checkpoint saved at {checkpoint}. "
            "Continue with the same command plus --resume."
        )


class StorageError(UserError, OSError):
    """A file could not be written (disk full, quota, read-only): the message names the path."""


def short(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for error messages about values of any size."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
