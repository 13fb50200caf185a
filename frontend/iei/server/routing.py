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

from .errors import TooManyJsonValues

# Bodies up to this size are parsed on the loop: the hop to a thread costs more than the work.
INLINE_JSON_BYTES = 256 * 1024
# Most values a JSON body may hold (strings, numbers, lists, objects), far above a request of
# 64 inputs (and 64 labels). A 64 MiB body of `{},` is 22 million objects: over a gigabyte once
# parsed, and half a minute of validation that holds the interpreter (uvicorn then kills the
# worker, and all its requests, as hung).
MAX_JSON_VALUES = 100_000
# A JSON string, or a character that starts a value after the first: `,` `[` `{`.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[,\[{]')


def parse_json(body: bytes) -> Any:
    """`body` parsed (a json.JSONDecodeError: FastAPI's 422 for bad JSON), once it is known to
    hold at most MAX_JSON_VALUES values (a 422 otherwise). Commas are counted first, at C speed:
    a body of fewer holds fewer values, whatever is in its strings (a base64 image has none);
    past that only the commas outside strings count."""
    if body.count(b",") > MAX_JSON_VALUES:
        values = 0
        for token in _JSON_TOKEN.finditer(body):
            values += token.end() - token.start() == 1
            if values > MAX_JSON_VALUES:
                raise TooManyJsonValues(MAX_JSON_VALUES)
    return orjson.loads(body)


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = parse_json(body) if len(body) <= INLINE_JSON_BYTES else (
                await run_in_threadpool(parse_json, body)
            )  # fmt: skip
        return self._json


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose handler reads its JSON body through `OffLoopJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_off_loop(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return parse_off_loop
