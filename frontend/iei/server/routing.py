"""Routes whose JSON body is parsed off the event loop when it is large: a 64 MiB body of base64
images takes tens of milliseconds to parse, time the loop owes every other request."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

# Bodies up to this size are parsed on the loop: the hop to a thread costs more than the work.
INLINE_JSON_BYTES = 256 * 1024


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            parse = orjson.loads  # raises a json.JSONDecodeError: FastAPI's 422 for bad JSON
            self._json = parse(body) if len(body) <= INLINE_JSON_BYTES else (
                await run_in_threadpool(parse, body)
            )  # fmt: skip
        return self._json


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose handler reads its JSON body through `OffLoopJSONRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def parse_off_loop(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return parse_off_loop
