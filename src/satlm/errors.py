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


class TrainingInterrupted(SATLMError):
    """Training stopped on SIGINT / SIGTERM; the message names the checkpoint and how to resume. The CLI
    exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports such a stop."""

    def __init__(self, message: str, signum: int = 2):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class NumericalError(SATLMError):
    """A NaN or inf training loss or gradient; the message names the step and the last good checkpoint."""


class CheckpointError(SATLMError):
    """A checkpoint that could not be written whole (disk full, ...); the previous checkpoints are intact."""


class GradientCheckpointingError(SATLMError, RuntimeError):
    """A second training forward before the first one's backward, under gradient checkpointing: the first
    forward's layers would be recomputed in the backward with the second forward's kept units."""


__all__ = ["SATLMError", "RunConfigError", "DataError", "ModelLoadError", "TrainingInterrupted", "NumericalError",
           "CheckpointError", "GradientCheckpointingError"]
