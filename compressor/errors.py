"""Exceptions that separate the user's mistakes from our own bugs.

The CLI prints a `CompressorError` as one line and exits 2; anything else is an
internal error (exit 1).
"""

from __future__ import annotations


class CompressorError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits 2."""


class ModelError(CompressorError):
    """The ONNX model cannot be read, is invalid, or is unsafe to load."""


class DataError(CompressorError):
    """Calibration or evaluation data does not fit the model or is malformed."""


class UsageError(CompressorError):
    """Flags that contradict each other, name something unknown, or are not implemented yet."""


class ConfigError(UsageError):
    """A recipe or config table with an unknown key, a value of the wrong type, or an impossible combination."""


class MissingContextError(CompressorError):
    """A pipeline pass needs data (calibration, labels, training set) that was not given."""


class BackendUnavailableError(CompressorError):
    """The requested backend cannot run here (e.g. no CUDA execution provider)."""


class PassFailedError(Exception):
    """A pass raised; the message names the pass and those that ran before it."""
