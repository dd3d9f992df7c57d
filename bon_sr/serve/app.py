"""The FastAPI app: routes, the API key, body limits, disconnects and the one error handler.

``create_app(engine, settings)`` builds the app around an engine object (``BonEngine``, or
a fake in tests) without binding a port. Its lifespan starts loading the engine in the
background, so ``/health`` answers 503 while the model loads and 200 once it is ready,
and shuts the engine down after uvicorn has finished the in-flight requests (SIGTERM:
uvicorn stops accepting, drains, then runs the lifespan's exit).

Routes only parse and hand over to ``service``: auth, size and JSON checks happen in
``read_request`` before the body is validated; every exception, ours or the framework's,
goes through ``handle_error`` (``errors.error_for``). A request runs under
``until_disconnect``: when the client goes away its Best-of-N task is cancelled and vLLM
aborts its requests. Streamed replies are sent once selection is done (the first chunk
comes after Best-of-N has finished).

This module knows nothing about selection or sampling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..jsonl import finite_or_none
from . import service
from .errors import ApiError, error_for, request_error, retry_after
from .protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .settings import ServeSettings

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
#: nginx's code for "client closed the request": what the log shows for a disconnect
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client closed the connection while sending its body: nothing to answer, no error."""


async def client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    status, body = error_for(exc)
    return JSONResponse(body.model_dump(), status_code=status, headers=retry_after(exc))


def check_api_key(request: Request, settings: ServeSettings) -> None:
    if settings.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
        raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' (the openai client's "
                            "api_key=).")


async def read_request(request: Request, model: type[M]) -> M:
    """The body as ``model``: API key first, then the size cap (413), JSON (400), fields (400)."""
    settings: ServeSettings = request.app.state.settings
    check_api_key(request, settings)
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"The request body is {declared} bytes; this server accepts at most {limit} "
                            "(--max-body-bytes).")
    async def body() -> list[bytes]:
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"The request body is over {limit} bytes (--max-body-bytes).")
            parts.append(chunk)
        return parts

    try:
        # a client that stalls mid-body would otherwise hold its connection forever
        parts = await asyncio.wait_for(body(), settings.body_timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {settings.body_timeout:g} s "
                            "(--body-timeout).") from None
    except ClientDisconnect:
        raise ClientGone() from None
    try:
        data = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"The request body must be a JSON object, got {type(data).__name__}.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:  # here only: a ValidationError elsewhere is our bug, a 500
        raise request_error(exc) from None


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run ``work`` unless the client disconnects first (then cancel it). The body must
    already be read: this consumes the request's remaining ASGI messages."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    logger.info("client disconnected from %s; its Best-of-N was cancelled and its vLLM requests aborted",
                request.url.path)
    return None


def reply(result: service.Reply | None) -> Response:
    if result is None:
        return Response(status_code=CLIENT_CLOSED)
    if result.chunks is not None:
        return StreamingResponse(iter(result.chunks), media_type="text/event-stream")
    return JSONResponse(finite_or_none(result.body.model_dump()))


def create_app(engine: Any, settings: ServeSettings, *, on_failure: Callable[[], None] | None = None) -> FastAPI:
    """The server's app. ``engine``: ``BonEngine(settings)`` or an object with its surface.
    ``on_failure``: called when the engine fails to load (the CLI stops the server)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        async def load() -> None:
            await engine.start()
            if engine.state == "failed" and on_failure is not None:
                on_failure()

        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            # Stopped while loading: the build thread cannot be interrupted, so wait for it;
            # start() then shuts the new engine down instead of leaving its process behind.
            engine.close()
            await loading

    app = FastAPI(title="bon-sr", summary="OpenAI-compatible Best-of-N by stable rank", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    for exc_class in (Exception, HTTPException, RequestValidationError, ApiError):
        app.add_exception_handler(exc_class, handle_error)
    app.add_exception_handler(ClientGone, client_gone)

    @app.get("/health")
    async def health() -> dict[str, str]:
        service.require_ready(engine)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_api_key(request, settings)
        return ModelList(data=[ModelCard(id=settings.name, max_model_len=engine.context)]).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_request(request, ChatCompletionRequest)
        return reply(await until_disconnect(request, service.complete(body, settings, engine)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_request(request, CompletionRequest)
        return reply(await until_disconnect(request, service.complete(body, settings, engine)))

    return app
