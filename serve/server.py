"""`stepforge serve`: an OpenAI-compatible HTTP server in front of any backend.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
plus GET /health and POST /tokenize (as vLLM serves them). Concurrent HTTP
requests are merged into backend batches by a `RequestBatcher`. Errors use
OpenAI's body: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from .base import GenerationResult, ModelBackend
from .batcher import RequestBatcher
from .errors import (
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    ServeError,
)
from .openai_schema import ChatBody, CompletionBody, TokenizeBody

DEFAULT_CHAT_MAX_TOKENS = 512


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of(exc: ServeError) -> tuple[int, str, str | None]:
    """HTTP status, error type and code for a serving error."""
    if isinstance(exc, PromptTooLongError):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(exc, InvalidRequestError):
        return 400, "invalid_request_error", None
    if isinstance(exc, ModelNotFoundError):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(exc, (BackendUnavailableError, ConfigError)):
        return 503, "server_error", None
    return 500, "server_error", None


def usage(results: list[GenerationResult]) -> dict[str, int]:
    """OpenAI usage: each prompt counted once, every completion counted."""
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(backend: ModelBackend, model_name: str, max_batch: int = 64):
    """The FastAPI app serving `backend` under the name `model_name`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = RequestBatcher(backend, max_batch=max_batch)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="stepforge serve", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        return JSONResponse(status_code=400, content=error_body("; ".join(parts) or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail)))

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, exc: ServeError):
        status, type_, code = status_of(exc)
        return JSONResponse(status_code=status, content=error_body(str(exc), type_, code))

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ModelNotFoundError(f"The model `{name}` does not exist; this server serves `{model_name}`.")

    async def run(requests) -> list[GenerationResult]:
        return await asyncio.wrap_future(batcher.submit(requests))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "stepforge"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> dict[str, Any]:
        check_model(body.model)
        results = await run(body.to_requests())
        choices = [
            {"index": i * body.n + k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
            for i, r in enumerate(results)
            for k, c in enumerate(r.completions)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": usage(results),
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> dict[str, Any]:
        check_model(body.model)
        results = await run(body.to_requests(DEFAULT_CHAT_MAX_TOKENS))
        choices = [
            {"index": k, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
             "finish_reason": c.finish_reason, "completion_tokens": c.completion_tokens}
            for k, c in enumerate(results[0].completions)
        ]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": usage(results),
        }

    @app.post("/tokenize")
    async def tokenize(body: TokenizeBody) -> dict[str, int]:
        check_model(body.model)
        return {"count": await asyncio.to_thread(backend.count_tokens, body.prompt)}

    return app


def run_server(backend: ModelBackend, model_name: str, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Serve until interrupted, then close the backend."""
    import uvicorn

    try:
        uvicorn.run(create_app(backend, model_name), host=host, port=port, log_level=log_level)
    finally:
        backend.close()
