"""Typed errors of the serving layer.

Every error raised on purpose by `stepforge.serve` is a `ServeError`, so callers
(the loop, the CLI, the HTTP server) can catch one class and show one clear
line. The classes take a single message argument so they survive pickling
across Ray processes unchanged.
"""

from __future__ import annotations

from stepforge import errors
from stepforge.errors import StepforgeError


class ServeError(StepforgeError):
    """Base class of every serving error."""


ConfigError = errors.ConfigError  # a backend configuration is invalid or inconsistent: the one config error


class ModelNotFoundError(ServeError):
    """A model or adapter path does not exist or does not hold a model."""


class PromptTooLongError(ServeError):
    """A prompt does not fit in the model's context window."""


class InvalidRequestError(ServeError):
    """A generation request is malformed (e.g. neither prompt nor messages)."""


class BackendUnavailableError(ServeError):
    """A backend cannot be reached or started (server down, engine missing)."""


class GenerationError(ServeError):
    """A backend failed while generating (remote error, crashed worker)."""
