"""satlm's own error types: the CLI turns each into one line on stderr and a non-zero exit."""

from __future__ import annotations


class SATLMError(Exception):
    """Base of every error satlm raises on purpose (bad config, bad data, a model it cannot use)."""


class RunConfigError(SATLMError, ValueError):
    """A run config that cannot be used: an unknown key, a value of the wrong type or out of range."""


class DataError(SATLMError, ValueError):
    """Training or evaluation data that is missing, empty or malformed; the message names the file (and line)."""


class ModelLoadError(SATLMError):
    """A model or tokenizer that cannot be loaded from the given path or hub name."""


__all__ = ["SATLMError", "RunConfigError", "DataError", "ModelLoadError"]
