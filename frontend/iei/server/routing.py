"""Routes whose JSON body is parsed off the event loop when it is large: a 64 MiB body of base64
images takes tens of milliseconds to parse, time the loop owes every other request."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from .errors import ApiError, ErrorType, TooManyJsonValues

# Bodies up to this size are parsed on the loop: the hop to a thread costs more than the work.
INLINE_JSON_BYTES = 256 * 1024
# Most values a JSON body may hold (strings, numbers, lists, objects), far above a request of
# 64 inputs (and 64 labels). A 64 MiB body of `{},` is 22 million objects: over a gigabyte once
# parsed, and half a minute of validation that holds the interpreter (uvicorn then kills the
# worker, and all its requests, as hung).
MAX_JSON_VALUES = 100_000
# A JSON string (a key or a value), or a character that starts a value after the first: `,` `[`
# `{`. A value brings at most three (its key, its comma, itself). Possessive, and a string left
# open runs to the end: no input makes the search go back over what it read (`"` and 20,000 `\"`
# before the commas took 70 s with a backtracking pattern).
_JSON_TOKEN = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)|[,\[{]', re.DOTALL)


def parse_json(body: bytes) -> Any:
    """`body` parsed (a json.JSONDecodeError: FastAPI's 422 for bad JSON), once it is known to
    hold at most MAX_JSON_VALUES values (a 422 otherwise). A body parsed on the loop is too
    small to hold enough to matter and is not counted. Commas are counted first, at C speed: a
    body of fewer holds fewer values, whatever is in its strings (a base64 image has none); past
    that its tokens are counted, up to three a value, so that the count stops early however the
    body is made (tens of millions of empty strings once took seconds to read through)."""
    if len(body) > INLINE_JSON_BYTES and body.count(b",") > MAX_JSON_VALUES:
        for tokens, _ in enumerate(_JSON_TOKEN.finditer(body)):
            if tokens >= 3 * MAX_JSON_VALUES:
                raise TooManyJsonValues(MAX_JSON_VALUES)
    return orjson.loads(body)


def mime_type(content_type: str) -> str:
    """`image/JPEG; q=1` -> `image/jpeg`."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str | None) -> bool:
    """A JSON body by its Content-Type: `application/json`, `application/*+json`, or none at all
    (a client that sends none, or an empty `Content-Type:`: read as JSON, never as bytes)."""
    if not content_type:
        return True
    mime = mime_type(content_type)
    return mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = parse_json(body) if len(body) <= INLINE_JSON_BYTES else (
                await run_in_threadpool(parse_json, body)
            )  # fmt: skip
        return self._json


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose handler reads its JSON body through `OffLoopJSONRequest`; a body of
    another Content-Type is a 415 (FastAPI would validate its bytes as the JSON model and answer
    "Input should be a valid dictionary"), a body without one is JSON."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **options: Any) -> None:
        super().__init__(path, endpoint, **{**options, "strict_content_type": False})

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_off_loop(request: Request) -> Response:
            content_type = request.headers.get("content-type")
            if self.body_field is not None and not is_json(content_type):
                raise ApiError(
                    ErrorType.VALIDATION,
                    f"Content-Type {content_type!r} is not supported: send `application/json`",
                    status=415,
                )
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return parse_off_loop
