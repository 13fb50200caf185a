"""The client's typed errors, and the mapping from the server's answers to them."""

from __future__ import annotations

import httpx
import orjson


class IEIError(Exception):
    """An error answer of the service (`status`, `error_type`, `message` as the server sent
    them), or a service that could not be reached (`status` None)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {error_type}: {message}" if status else message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after


class ValidationError(IEIError):
    """400/413/422: the request or one of its images was refused; retrying cannot help."""


class AuthenticationError(IEIError):
    """401: the API key is missing or wrong."""


class OverloadedError(IEIError):
    """429: the service refused the request for now (after the client's retries ran out)."""


class UnavailableError(IEIError):
    """503, or no connection: the model is not ready or the service is down."""


class BackendError(IEIError):
    """424/500/504: Triton failed the inference, or the request timed out on the server."""


ERRORS_BY_STATUS: dict[int, type[IEIError]] = {
    400: ValidationError,
    401: AuthenticationError,
    413: ValidationError,
    422: ValidationError,
    429: OverloadedError,
    503: UnavailableError,
}
RETRIED_STATUSES = frozenset({429, 503})


def error_from_response(response: httpx.Response) -> IEIError:
    """The typed error for a non-2xx answer, from either of the server's envelopes."""
    message, error_type = response.text or response.reason_phrase, None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI's envelope
            message, error_type = str(error.get("message")), error.get("code")
        elif error is not None:  # TEI's envelope
            message, error_type = str(error), body.get("error_type")
    kind = ERRORS_BY_STATUS.get(response.status_code)
    if kind is None:
        kind = (
            BackendError if response.status_code >= 500 or response.status_code == 424 else IEIError
        )
    return kind(
        message,
        status=response.status_code,
        error_type=error_type,
        retry_after=parse_retry_after(response.headers.get("retry-after")),
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header (the HTTP-date form is not used by IEI)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
