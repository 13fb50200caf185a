"""ASGI middleware: request ids and metrics around everything, then admission and the body limit
(before anything is read)."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .auth import UNAUTHORIZED, key_accepted
from .errors import (
    HTTP_ERROR_TYPES,
    BodiesOverloaded,
    ErrorType,
    PayloadTooLarge,
    SlowBody,
    error_response,
    overloaded,
)
from .limits import Capacity, request_work
from .logs import REQUEST_ID, printable, request_id_from

log = logging.getLogger("iei")


class RequestContext:
    """Outermost: an id per request (the client's X-Request-Id when sane, else a new one) in
    the response header, in error bodies and in one log line per request (no payload)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = request_id_from(given)
        token = REQUEST_ID.set(request_id)
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Answered here, inside the request's context: Starlette's own handler of the
            # unexpected runs outside every middleware, where the id is gone.
            if started:
                raise
            log.exception("unexpected error")
            response = error_response(scope["path"], 500, ErrorType.INTERNAL, "internal error")
            await response(scope, receive, send_with_id)
        finally:
            log.info(
                "%s %s %d %.1f ms",
                printable(scope["method"]), printable(scope["path"]), status,
                (time.perf_counter() - start) * 1000,
            )  # fmt: skip
            REQUEST_ID.reset(token)


# Open without the API key, as in TEI: probes, metrics, the API docs and the demo page (GET /).
OPEN_PATHS = frozenset({"/health", "/live", "/metrics", "/openapi.json", "/docs", "/redoc"})
# Routes that hold images in flight: refused at once while the worker is full.
EMBEDDING_PATHS = frozenset(
    {"/", "/embed", "/v1/embeddings", "/embeddings", "/v2/embed", "/classify"}
)


class Admission:
    """Before anything of the body is read: the API key (401) and, on the embedding routes, a
    worker already at IEI_MAX_CONCURRENT_IMAGES (429). A large body then costs nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        services = getattr(scope["app"].state, "services", None)
        refusal = None
        is_open = path in OPEN_PATHS or path.startswith("/docs") or (method, path) == ("GET", "/")
        if services is not None and not is_open:
            authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not key_accepted(authorization, services.settings.api_key):
                refusal = UNAUTHORIZED
            elif method == "POST" and path in EMBEDDING_PATHS and services.permits.full:
                refusal = overloaded(services.settings.max_concurrent_images)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = error_response(
            path, refusal.status, refusal.error_type, refusal.message, refusal.headers
        )
        await response(scope, receive, send)


class BodyLimit:
    """The request body, within three bounds: `limit` bytes (413), `bodies`, what all the bodies
    a worker holds may take together (429 with Retry-After), and `read_timeout` seconds for the
    whole body to arrive (408). A body counts as its bytes arrive (a Content-Length that could
    not fit beside the others is refused at once, before anything is read, but reserves nothing:
    a client that declares 64 MiB and sends nothing holds nothing), and stays counted until the
    request's work has ended (its bytes live on in that work)."""

    def __init__(self, app: ASGIApp, limit: int, bodies: Capacity, read_timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.bodies = bodies
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = 0
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                declared = int(value)
        refusal: HTTPException | None = None
        if declared > self.limit:
            refusal = PayloadTooLarge(self.limit)
        elif not self.bodies.could_take(declared):
            refusal = BodiesOverloaded(self.bodies.capacity)
        if refusal is not None:
            error_type = HTTP_ERROR_TYPES.get(refusal.status_code, ErrorType.VALIDATION)
            await error_response(
                scope["path"], refusal.status_code, error_type, refusal.detail,
                dict(refusal.headers or {}),
            )(scope, receive, send)  # fmt: skip
            return
        received, complete = 0, False  # bytes arrived, and held in `bodies`
        deadline = asyncio.get_running_loop().time() + self.read_timeout

        async def counting_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: waits for a disconnect, unbounded
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise SlowBody(self.read_timeout) from None
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received + size > self.limit:
                    raise PayloadTooLarge(self.limit)
                if not self.bodies.try_take(size):
                    raise BodiesOverloaded(self.bodies.capacity)
                received += size
            return message

        with request_work() as work:
            try:
                await self.app(scope, counting_receive, send)
            finally:
                work.then(lambda: self.bodies.give_back(received))


# The route label of every path that no route matches: clients choose paths, and each label
# value is a time series of its own.
UNMATCHED = "unmatched"


def route_label(scope: Scope) -> str:
    """The route template of a request (`/embed`, not its raw path), also for an answer given
    before routing (401, 413, 429): then the route it was meant for; UNMATCHED for none."""
    route = scope.get("route")
    if route is None:
        templates = getattr(scope["app"].state, "routes", ())
        route = next((r for r in templates if r.path_regex.match(scope["path"])), None)
    return str(getattr(route, "path", UNMATCHED))


class RequestMetrics:
    """Count and time every request by its route template and status, the answers of the
    admission and the body limit included (this wraps them)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def remember_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, remember_status)
        finally:
            metrics.IN_FLIGHT.dec()
            route = route_label(scope)
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)
