"""Inference requests to Triton whose files are written to the socket one by one.

tritonclient builds a BYTES input by joining every item behind its 4-byte length, then joins that
with the request's JSON header: two copies of every image file, into buffers as large as the
request (50 MB for 32 phone photos, fresh memory each time). Here the same request (KServe's
binary tensor extension: the JSON header, then each input's bytes) goes out as a payload of parts
that aiohttp writes in turn; the response is read by tritonclient as before. 1.9 ms of the
frontend's CPU per 1.6 MB photo in 32-image chunks went to those joins (docs/benchmarks.md).
Where Triton takes the worker's shared memory region (triton_shm.py), the files are copied there
instead and the request only names their block.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import quote

import orjson
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from . import metrics
from .triton_shm import SharedMemoryRegion

LENGTH = struct.Struct("<I")  # each BYTES element's length, little-endian


class FilesInput(InferInput):
    """A BYTES input of (N, 1) items kept as they are (image files, encoded texts)."""

    def __init__(self, name: str, items: Sequence[bytes]) -> None:
        super().__init__(name, [len(items), 1], "BYTES")
        self.items = list(items)
        self._parameters["binary_data_size"] = sum(LENGTH.size + len(x) for x in self.items)

    def parts(self) -> Iterator[bytes]:
        for item in self.items:
            yield LENGTH.pack(len(item))
            yield item

    def _get_binary_data(self) -> bytes:
        """tritonclient's own requests (another client's infer): serialised as it would."""
        return b"".join(self.parts())


class PartsPayload(Payload):
    """A request body of byte strings written one after the other, never joined."""

    def __init__(self, parts: list[bytes]) -> None:
        super().__init__(parts, content_type="application/octet-stream")
        self._size = sum(len(part) for part in parts)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        for part in self._value:
            await writer.write(part)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        if content_length is None:
            await self.write(writer)
            return
        for part in self._value:
            if content_length <= 0:
                break
            await writer.write(memoryview(part)[:content_length])
            content_length -= len(part)


def request_parts(
    inputs: Sequence[FilesInput],
    outputs: Sequence[InferRequestedOutput],
    priority: int,
    shared: tuple[str, int] | None = None,
) -> tuple[list[bytes], int]:
    """The parts of a binary inference request and the length of its JSON header. `shared`:
    the (region, offset) of a system shared memory region that holds the one input's bytes,
    which the request then only names."""
    described = []
    for i in inputs:
        size = i._parameters["binary_data_size"]
        where = (
            {"binary_data_size": size} if shared is None
            else {"shared_memory_region": shared[0], "shared_memory_byte_size": size,
                  "shared_memory_offset": shared[1]}
        )  # fmt: skip
        described.append(
            {"name": i.name(), "shape": i.shape(), "datatype": i.datatype(), "parameters": where}
        )
    request: dict[str, Any] = {
        "inputs": described,
        "outputs": [{"name": o.name(), "parameters": {"binary_data": True}} for o in outputs],
    }
    if priority:
        request["parameters"] = {"priority": priority}
    header = orjson.dumps(request)  # compact, as tritonclient's; a tenth of json.dumps' time
    if shared is not None:
        return [header], len(header)
    return [header, *(part for i in inputs for part in i.parts())], len(header)


class TritonHttpClient(InferenceServerClient):
    """tritonclient's async HTTP client; an inference of FilesInput inputs whose outputs are
    all binary goes out part by part, and Triton's answers come back uncompressed."""

    def __init__(
        self, url: str, *, shared_memory: SharedMemoryRegion | None = None, **options: Any
    ) -> None:
        super().__init__(url, **options)
        self.shared_memory = shared_memory
        # How long a block stays taken after a call that ended without Triton's answer (a
        # timeout, a dropped connection): Triton may still be reading it.
        self.release_after = float(options.get("conn_timeout", 60.0))

    def _fix_header(self, headers: dict[str, Any] | None) -> dict[str, str]:
        # aiohttp asks for gzip, deflate and br unless told otherwise, and Triton then gzips
        # every answer: CPU in Triton and in the frontend for float vectors that barely shrink
        # on loopback. A caller's own Accept-Encoding (tritonclient's response compression) wins.
        fixed: dict[str, str] = super()._fix_header(headers)
        if not any(name.lower() == "accept-encoding" for name in fixed):
            fixed["Accept-Encoding"] = "identity"
        return fixed

    async def infer(  # type: ignore[override]
        self,
        model_name: str,
        inputs: Sequence[InferInput],
        outputs: Sequence[InferRequestedOutput] | None = None,
        priority: int = 0,
        **options: Any,
    ) -> InferResult:
        if options or not outputs or not all(isinstance(i, FilesInput) for i in inputs):
            return await super().infer(
                model_name, inputs, outputs=outputs, priority=priority, **options
            )
        files: Sequence[FilesInput] = inputs  # type: ignore[assignment]
        region = self.shared_memory
        if region is not None and len(files) == 1 and await region.ready(self):
            offset = region.write(list(files[0].parts()))
            if offset is not None:
                try:
                    result = await self._files_call(
                        model_name, files, outputs, priority, (region.name, offset)
                    )
                except InferenceServerException as exc:
                    region.release(offset)  # Triton answered: done with the block
                    if region.name not in (exc.message() or ""):
                        raise
                    region.forget()  # Triton restarted without it: this call goes in the body
                except BaseException:
                    region.release(offset, later=self.release_after)
                    raise
                else:
                    region.release(offset)
                    metrics.TRITON_FILE_CALLS.labels("shared_memory").inc()
                    return result
        metrics.TRITON_FILE_CALLS.labels("body").inc()
        return await self._files_call(model_name, files, outputs, priority, None)

    async def _files_call(
        self,
        model_name: str,
        files: Sequence[FilesInput],
        outputs: Sequence[InferRequestedOutput],
        priority: int,
        shared: tuple[str, int] | None,
    ) -> InferResult:
        parts, header_length = request_parts(files, outputs, priority, shared)
        headers = {"Inference-Header-Content-Length": str(header_length)}
        uri = f"v2/models/{quote(model_name)}/infer"
        response = await self._post(uri, PartsPayload(parts), headers, None)
        body = await response.read()
        if response.status != 200:
            raise error_of(response.status, body)
        return InferResult.from_response_body(
            body,
            False,
            response.headers.get("Inference-Header-Content-Length"),
            response.headers.get("Content-Encoding"),
        )


def error_of(status: int, body: bytes) -> InferenceServerException:
    """Triton's error answer as tritonclient raises it: its `error` message and the status."""
    try:
        message = json.loads(body)["error"] if body else "empty response from the server"
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace")[:1000]
    return InferenceServerException(msg=message, status=str(status))
