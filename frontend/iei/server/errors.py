"""One error table from error type to HTTP status, as TEI has it, and two envelopes.

TEI's routes answer `{"error": "...", "error_type": "..."}`; the OpenAI-compatible routes answer
OpenAI's `{"error": {"message", "type", "code"}}` so that OpenAI SDKs raise proper errors, and the
Cohere-compatible route Cohere's `{"message": "..."}` (its SDKs raise it as their error's body). The
status codes are the same. Every error goes through here: our own, FastAPI's validation errors,
Starlette's 404/405, the body limit, and anything unexpected (without its stack trace).
"""

from __future__ import annotations

import logging
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .logs import REQUEST_ID

log = logging.getLogger("iei")

OPENAI_PATHS = ("/v1/embeddings", "/embeddings")
OPENAI_PREFIX = "/v1/"  # /v1/models too
COHERE_PATHS = ("/v2/embed",)


class ErrorType(StrEnum):
    EMPTY = "Empty"
    VALIDATION = "Validation"
    UNAUTHORIZED = "Unauthorized"
    OVERLOADED = "Overloaded"
    BACKEND = "Backend"
    UPSTREAM = "Upstream"  # the server of a URL input: unreachable, or it failed (its 5xx)
    UNHEALTHY = "Unhealthy"
    TIMEOUT = "Timeout"
    NOT_FOUND = "NotFound"
    INTERNAL = "Internal"


STATUS = {
    ErrorType.EMPTY: 400,
    ErrorType.VALIDATION: 422,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.OVERLOADED: 429,
    ErrorType.BACKEND: 424,
    ErrorType.UPSTREAM: 502,
    ErrorType.UNHEALTHY: 503,
    ErrorType.TIMEOUT: 504,
    ErrorType.NOT_FOUND: 404,
    ErrorType.INTERNAL: 500,
}

# OpenAI's `type` for each of ours.
OPENAI_TYPES = {
    ErrorType.EMPTY: "invalid_request_error",
    ErrorType.VALIDATION: "invalid_request_error",
    ErrorType.NOT_FOUND: "invalid_request_error",
    ErrorType.UNAUTHORIZED: "authentication_error",
    ErrorType.OVERLOADED: "rate_limit_error",
}


class ApiError(Exception):
    """Raised anywhere in a request; becomes the JSON error response."""

    def __init__(
        self,
        error_type: ErrorType,
        message: str,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status or STATUS[error_type]
        self.headers = headers
        self.code = code  # OpenAI's `code`, where it has its own (model_not_found)


class PayloadTooLarge(StarletteHTTPException):
    """The body grew past IEI_PAYLOAD_LIMIT while being read (FastAPI re-raises HTTPExceptions
    from body parsing as they are)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"payload is larger than the limit of {limit} bytes")


class BodiesOverloaded(StarletteHTTPException):
    """The bodies this worker holds would pass IEI_BODY_WORKER_MAX_BYTES: retry later."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            429,
            f"too many request bodies in flight: this worker holds at most {limit} bytes of "
            "them (IEI_BODY_WORKER_MAX_BYTES); retry later",
            headers={"Retry-After": "1"},
        )


class TooManyJsonValues(StarletteHTTPException):
    """A JSON body of more values than any request needs (routing.MAX_JSON_VALUES)."""

    def __init__(self, limit: int) -> None:
        super().__init__(422, f"the JSON body holds more than {limit} values")


class SlowBody(StarletteHTTPException):
    """The body did not arrive within IEI_BODY_READ_TIMEOUT."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408, f"the request body did not arrive within {seconds:g} s (IEI_BODY_READ_TIMEOUT)"
        )


# The error types of Starlette's and our HTTPExceptions, by status (else Validation).
HTTP_ERROR_TYPES = {404: ErrorType.NOT_FOUND, 408: ErrorType.TIMEOUT, 429: ErrorType.OVERLOADED}


def overloaded(limit: int, count: int | None = None) -> ApiError:
    more = f"{count} more inputs" if count is not None else "more inputs"
    return ApiError(
        ErrorType.OVERLOADED,
        f"model is overloaded: {more} would exceed the limit of {limit} inputs in flight",
        headers={"Retry-After": "1"},
    )


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith(OPENAI_PREFIX)


def error_body(
    path: str, status: int, error_type: ErrorType, message: str, code: str | None = None
) -> dict[str, object]:
    body: dict[str, object]
    if path in COHERE_PATHS:
        body = {"message": message}
    elif is_openai_path(path):
        kind = OPENAI_TYPES.get(error_type, "server_error" if status >= 500 else "api_error")
        body = {"error": {"message": message, "type": kind, "code": code or str(error_type)}}
    else:
        body = {"error": message, "error_type": str(error_type)}
    request_id = REQUEST_ID.get()
    if request_id:  # quote it when reporting a problem; the logs carry the same id
        body["request_id"] = request_id
    return body


def error_response(
    path: str,
    status: int,
    error_type: ErrorType,
    message: str,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(path, status, error_type, message, code), status_code=status, headers=headers
    )


def describe_validation_error(exc: RequestValidationError) -> str:
    """Pydantic's error list -> one readable sentence naming where each problem is."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = error.get("msg", "invalid value")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            request.url.path, exc.status, exc.error_type, exc.message, exc.headers, exc.code
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = describe_validation_error(exc)
        return error_response(request.url.path, 422, ErrorType.VALIDATION, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = HTTP_ERROR_TYPES.get(exc.status_code, ErrorType.VALIDATION)
        return error_response(
            request.url.path, exc.status_code, error_type, str(exc.detail), dict(exc.headers or {})
        )

    @app.exception_handler(ClientDisconnect)
    async def _disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # A raw or form upload cut short (a JSON body is FastAPI's 400 already): the client's
        # doing, answered like it though no one reads it, and no traceback in the log.
        log.info("%s: the client closed the connection before its body was read",
                 request.url.path)  # fmt: skip
        message = "the client closed the connection before its body was read"
        return error_response(request.url.path, 400, ErrorType.VALIDATION, message)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(request.url.path, 500, ErrorType.INTERNAL, "internal error")


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error a request reports when its concurrent parts failed (asyncio.TaskGroup): the
    first API or input error (a cancellation is no reason), else the first of any kind."""
    leaves: list[BaseException] = []

    def flatten(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                flatten(inner)
        else:
            leaves.append(error)

    flatten(group)
    return next((e for e in leaves if isinstance(e, ApiError | ValueError)), leaves[0])
