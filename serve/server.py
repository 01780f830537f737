"""`stepforge serve`: an OpenAI-compatible HTTP server in front of any backend.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
plus GET /health and POST /tokenize (as vLLM serves them). Concurrent HTTP
requests are scheduled round-robin onto the backend by a `RequestBatcher`.

Hostile input is stopped at the edge: bodies over `max_body_bytes` are refused
before they are read whole (413), bodies slower than `body_timeout_s` get 408,
work past `max_queued_units` gets 503, every field is validated strictly against
`ServerLimits` (400), and every failure, unexpected ones included, answers
with OpenAI's body: {"error": {"message", "type", "param", "code"}}. Work of a
client that disconnects is cancelled, and SIGTERM stops the server within
`shutdown_timeout_s` plus the batch in progress.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

# at module level: FastAPI resolves the handlers' `request: Request` annotations here
from fastapi import Request
from pydantic import ValidationError

from .base import GenerationRequest, GenerationResult, ModelBackend
from .batcher import RequestBatcher
from .errors import (
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    PromptTooLongError,
    ServeError,
)
from .openai_schema import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_LIMITS,
    ChatBody,
    CompletionBody,
    ServerLimits,
    TokenizeBody,
    error_param,
    parse_body,
)

DISCONNECT_POLL_S = 0.1
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request its client abandoned


class ApiError(Exception):
    """A failure answered with the OpenAI error envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


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


def validation_error(exc: ValidationError) -> ApiError:
    """A 400 naming each invalid field (`param` is the first one)."""
    parts, params = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid value")
        if err.get("type") == "json_invalid":
            msg = f"the body is not valid JSON text in UTF-8: {msg}"
        parts.append(f"{loc}: {msg}" if loc else msg)
        params.append(error_param(err.get("loc", ())))
    return ApiError(400, "; ".join(parts) or "invalid request", param=next((p for p in params if p), None))


def usage(results: list[GenerationResult]) -> dict[str, int]:
    """OpenAI usage: each prompt counted once, every completion counted."""
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _send_error(send, status: int, message: str, code: str | None = None, close: bool = False) -> None:
    raw = json.dumps(error_body(message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})


class BodyLimitMiddleware:
    """ASGI middleware reading each request body up to `max_bytes` before the
    app sees it. A larger Content-Length is refused unread and the connection
    closed; a streamed (chunked) body is refused as soon as its running count
    passes the limit, and the server discards the rest as it arrives (closing
    on a client still sending would reset the connection and lose the 413)."""

    def __init__(self, app, max_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"request body exceeds this server's limit of {self.max_bytes} bytes"
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(send, 400, "invalid Content-Length header", close=True)
                return
            if int(length) > self.max_bytes:
                await _send_error(send, 413, too_big, "request_too_large", close=True)
                return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read(receive)
        except TimeoutError:
            await _send_error(send, 408, f"the request body did not arrive within {self.timeout_s:g} s", "request_timeout", close=True)
            return
        if body is None:
            await _send_error(send, 413, too_big, "request_too_large")
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages: http.disconnect

        await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, or None once it passes `max_bytes` (or the client left)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def create_app(backend: ModelBackend, model_name: str, max_batch: int = 64, limits: ServerLimits = DEFAULT_LIMITS,
               close_backend: bool = False, close_timeout_s: float = 5.0):
    """The FastAPI app serving `backend` under the name `model_name`.

    On shutdown the batcher fails what is left and waits at most
    `close_timeout_s` for the batch in progress; then, with `close_backend`,
    the backend is closed (unless that batch is still running)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    batcher = RequestBatcher(backend, max_batch=max_batch, max_queued=limits.max_queued_units)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        stopped = await asyncio.to_thread(batcher.close, close_timeout_s)
        if close_backend and stopped and not app.state.backend_closed:
            app.state.backend_closed = True
            backend.close()

    app = FastAPI(title="stepforge serve", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.backend_closed = False
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)

    def reply(exc: ApiError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content=error_body(exc.message, exc.type, exc.code, exc.param))

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return reply(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return reply(ApiError(exc.status_code, str(exc.detail), type_))

    @app.exception_handler(ServeError)
    async def _serve_error(_request: Request, exc: ServeError):
        status, type_, code = status_of(exc)
        return reply(ApiError(status, str(exc), type_, code))

    @app.exception_handler(ClientGone)
    async def _gone(_request: Request, _exc: ClientGone):
        return reply(ApiError(CLIENT_CLOSED_REQUEST, "the client closed the request"))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        # Starlette logs the traceback after this reply is sent
        return reply(ApiError(500, f"internal server error ({type(exc).__name__})", "server_error"))

    async def parse(request: Request, kind):
        try:
            body = parse_body(kind, await request.body(), limits)
        except ValidationError as exc:
            raise validation_error(exc) from None
        if body.model is not None and body.model != model_name:
            raise ModelNotFoundError(f"The model `{body.model}` does not exist; this server serves `{model_name}`.")
        return body

    async def run(request: Request, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """The results of `requests`; their queued work is dropped if the
        client disconnects or the handler is cancelled (server shutdown)."""
        future = asyncio.wrap_future(batcher.submit(requests))
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if done:
                    return future.result()
                if await request.is_disconnected():
                    raise ClientGone()
        finally:
            future.cancel()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "stepforge"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await parse(request, CompletionBody)
        results = await run(request, body.to_requests())
        choices = [
            {"index": i * body.n + k, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
             "completion_tokens": c.completion_tokens}
            for i, r in enumerate(results)
            for k, c in enumerate(r.completions)
        ]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": usage(results),
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict[str, Any]:
        body = await parse(request, ChatBody)
        results = await run(request, body.to_requests(min(DEFAULT_CHAT_MAX_TOKENS, limits.max_tokens)))
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
    async def tokenize(request: Request) -> dict[str, int]:
        body = await parse(request, TokenizeBody)
        return {"count": await asyncio.to_thread(backend.count_tokens, body.prompt)}

    return app


def run_server(backend: ModelBackend, model_name: str, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "warning", limits: ServerLimits = DEFAULT_LIMITS, max_batch: int = 64,
               shutdown_timeout_s: int = 5) -> None:
    """Serve until interrupted (SIGINT/SIGTERM), then close the backend.

    On a signal, requests still running get `shutdown_timeout_s` seconds to
    finish before they are cancelled and their queued work dropped; the batch
    in progress then gets as long again before the process exits regardless.
    """
    import uvicorn

    app = create_app(backend, model_name, max_batch=max_batch, limits=limits, close_backend=True,
                     close_timeout_s=shutdown_timeout_s)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s)
    try:
        uvicorn.Server(config).run()
    finally:  # the server never started, or stopped without its lifespan shutdown
        if not app.state.backend_closed and app.state.batcher.close(1.0):
            backend.close()
