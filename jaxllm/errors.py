"""Errors meant for people: one line that names the problem.

The CLIs catch `JaxllmError`, print its message and exit with code 2; anything else
is a bug and keeps its traceback.
"""


class JaxllmError(Exception):
    """Base class for every error jaxllm raises on bad input."""


class ConfigError(JaxllmError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class CheckpointError(JaxllmError):
    """A checkpoint directory is missing, corrupt, or made for another config."""


class TokenizerError(JaxllmError):
    """A tokenizer model cannot be trained or loaded."""


class GenerationError(JaxllmError, ValueError):
    """Generation was asked for something it cannot do (e.g. a prompt longer than the context)."""


class DataError(JaxllmError, ValueError):
    """A corpus cannot be found, read or split, or prepared token shards do not match."""


class TrainingError(JaxllmError):
    """Training cannot go on: the loss became NaN/inf, or a resume does not match the run."""


class ConstraintError(JaxllmError, ValueError):
    """A regex, JSON Schema or choice list cannot be turned into a constraint."""


class CacheError(JaxllmError):
    """A cache directory or file that another user could write: jaxllm does not use it (cachedirs.py)."""
