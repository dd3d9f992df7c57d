"""Every error the server answers with, as OpenAI's error object, from one mapping.

``error_for(exc)`` turns any exception into ``(status, ErrorResponse)``: ``ApiError``
(raised by the server with its status; ``HookBusy`` (503, with ``retry_after``);
``request_error`` makes one from a body that failed
validation: wrong types, missing fields, 400 with the field's path as ``param``), bon-sr's ``ConfigError`` /
``InputError`` (400), vLLM's request-validation errors (400 naming the parameter), an HTTP
error of the framework (404, 405, ...), the hook's ``HookError`` (500 naming the worker's
exception type: that request failed, the engine goes on), and anything else as a 500
whose message names only the exception type (the traceback goes to the server's log,
never to the client). The app registers one handler that calls it.

This module knows nothing about engines or routes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..errors import BonSRError, ConfigError, InputError
from ..hook.aio import HookBusy
from ..hook.protocol import HookError
from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """An error with its HTTP status and, for a bad field, the field's name (``param``)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.retry_after = retry_after


def bad_field(param: str, exc: BonSRError | str) -> ApiError:
    return ApiError(400, str(exc), param=param)


def _loc(loc: tuple[Any, ...]) -> str:
    """('bon_sr', 'n') -> 'bon_sr.n'; ('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("body",):
            out += f".{part}" if out else str(part)
    return out


def request_error(exc: Any) -> ApiError:
    """A 400 for a request body that failed validation (pydantic's or FastAPI's error)."""
    errors = list(exc.errors())
    first = errors[0]
    param = _loc(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif first.get("type") == "missing":
        msg = "field required"
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ApiError(400, f"Invalid request: '{param}': {msg}{more}.", param=param or None)


def retry_after(exc: BaseException) -> dict[str, str]:
    """The Retry-After header of a 503 that asks the client to come back."""
    seconds = getattr(exc, "retry_after", None)
    return {} if seconds is None else {"Retry-After": str(max(1, int(round(seconds))))}


def error_for(exc: BaseException) -> tuple[int, ErrorResponse]:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    if isinstance(exc, RequestValidationError):
        exc = request_error(exc)
    elif isinstance(exc, (ConfigError, InputError)):
        exc = ApiError(400, str(exc))
    elif isinstance(exc, HTTPException):
        exc = ApiError(exc.status_code, str(exc.detail))
    vllm_errors = sys.modules.get("vllm.exceptions")
    if vllm_errors is not None and isinstance(exc, vllm_errors.VLLMClientError):
        # a request vLLM refuses (its SamplingParams checks): the client's fault, a 400
        param = getattr(exc, "parameter", None)
        exc = ApiError(400, f"vLLM refused the request: {exc}", param=param)
    if isinstance(exc, HookBusy):  # the hook's row budget and its queue are full
        exc = ApiError(503, str(exc), retry_after=exc.retry_after)
    if isinstance(exc, HookError):  # this request's scoring failed in the worker; the engine goes on
        logger.error("bon-sr serve: %s", exc)
        exc = ApiError(500, f"Internal server error (HookError: {exc.worker_error or 'error'} in vLLM's worker); "
                            "see the server log.")
    if not isinstance(exc, ApiError):
        logger.error("bon-sr serve: internal error", exc_info=exc)
        exc = ApiError(500, f"Internal server error ({type(exc).__name__}); see the server log.")
    kind = ERROR_TYPES.get(exc.status, "BadRequestError" if exc.status < 500 else "InternalServerError")
    return exc.status, ErrorResponse(error=ErrorInfo(message=exc.message, type=kind, param=exc.param,
                                                     code=exc.status))
