"""stepforge.serve: model backends behind one interface, and the Ray actors that host them.

The public API (heavy libraries load only when a backend is built):

    from stepforge.serve import BackendConfig, GenerationRequest, SamplingParams, make_backend
    from stepforge.serve.actors import ModelPool, init_ray
"""

from .base import (
    BackendConfig,
    Completion,
    GenerationRequest,
    GenerationResult,
    ModelBackend,
    SamplingParams,
    load_backend_config,
    make_backend,
)
from .errors import (
    BackendUnavailableError,
    ConfigError,
    GenerationError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    ServeError,
)

__all__ = [
    "BackendConfig",
    "BackendUnavailableError",
    "Completion",
    "ConfigError",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequestError",
    "ModelBackend",
    "ModelNotFoundError",
    "PromptTooLongError",
    "SamplingParams",
    "ServeError",
    "load_backend_config",
    "make_backend",
]
