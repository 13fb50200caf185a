"""One error envelope and one table from error type to HTTP status, as TEI has them.

Every error leaves the service as `{"error": "...", "error_type": "..."}`: our own, FastAPI's
validation errors, Starlette's 404/405, and anything unexpected (without its stack trace).
"""

from __future__ import annotations

import logging
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("iei")


class ErrorType(StrEnum):
    EMPTY = "Empty"
    VALIDATION = "Validation"
    OVERLOADED = "Overloaded"
    BACKEND = "Backend"
    UNHEALTHY = "Unhealthy"
    TIMEOUT = "Timeout"
    NOT_FOUND = "NotFound"
    INTERNAL = "Internal"


STATUS = {
    ErrorType.EMPTY: 400,
    ErrorType.VALIDATION: 422,
    ErrorType.OVERLOADED: 429,
    ErrorType.BACKEND: 424,
    ErrorType.UNHEALTHY: 503,
    ErrorType.TIMEOUT: 504,
    ErrorType.NOT_FOUND: 404,
    ErrorType.INTERNAL: 500,
}


class ApiError(Exception):
    """Raised anywhere in a request; becomes the JSON error response."""

    def __init__(self, error_type: ErrorType, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status or STATUS[error_type]


def error_response(status: int, error_type: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


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
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error_type, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, ErrorType.VALIDATION, describe_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error_type = ErrorType.NOT_FOUND if exc.status_code == 404 else ErrorType.VALIDATION
        return error_response(exc.status_code, error_type, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, ErrorType.INTERNAL, "internal error")
