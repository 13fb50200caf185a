"""Raw uploads: a request body that is the image file itself (`image/*`,
`application/octet-stream`), or a `multipart/form-data` form whose file parts are the images, in
order. The files go to Triton as they arrived: never base64, never parsed as JSON; a form's part
is joined once from the received chunks (memoryviews of them, no slice copies).

Options (`normalize`, ...) come as query parameters, and in a form also as text fields: the same
names and the same strict validation as the JSON body's fields (a boolean is exactly `true` or
`false`); an unknown name, or a name given twice, is refused.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import ApiError, ErrorType
from .routing import is_json, mime_type

JSON, RAW, MULTIPART = "json", "raw", "multipart"  # what a body is, from its Content-Type
RAW_TYPES = "`image/*`, `application/octet-stream`"
SUPPORTED_TYPES = f"`application/json`, {RAW_TYPES} or `multipart/form-data`"
# A form's text fields are options: a few short values. Files are bounded by the payload limit
# (the BodyLimit middleware counts every byte read) and their number by the client batch size;
# a part's headers by the parser's own limits (8 headers of at most 4 KiB).
MAX_FIELDS = 16
MAX_FIELD_BYTES = 1024
TEXT_BOOLEANS = {"true": True, "false": False}
TEXT_COUNT = re.compile(r"[0-9]{1,9}")  # a count as text: digits only (`+8`, `8.0` are refused)
M = TypeVar("M", bound=BaseModel)


def body_kind(content_type: str | None) -> str | None:
    """JSON (also without a Content-Type), RAW, MULTIPART, or None for a type that /embed does
    not take."""
    if content_type is None or is_json(content_type):
        return JSON
    mime = mime_type(content_type)
    if mime.startswith("image/") or mime == "application/octet-stream":
        return RAW
    if mime == "multipart/form-data":
        return MULTIPART
    return None


def unsupported_type(content_type: str | None) -> ApiError:
    return ApiError(
        ErrorType.VALIDATION,
        f"Content-Type {content_type!r} is not supported: send {SUPPORTED_TYPES}",
        status=415,
    )


@dataclass
class Upload:
    files: list[bytes]
    names: list[str | None]  # a form part's filename; None for a raw body
    fields: list[tuple[str, str]]  # options: the query's parameters, then the form's text fields


async def read_upload(request: Request, kind: str, max_files: int) -> Upload:
    """The images and options of a raw (RAW) or form (MULTIPART) request."""
    fields = list(request.query_params.multi_items())
    if kind == RAW:
        body = await request.body()
        if not body:
            raise ApiError(
                ErrorType.EMPTY, "the request body is empty: send the image file as the body"
            )
        return Upload([body], [None], fields)
    form = await read_form(request, max_files)
    if not form.files:
        raise ApiError(
            ErrorType.EMPTY,
            "the form has no file: each image is a part with a filename "
            "(`curl -F file=@photo.jpg`)",
        )
    return Upload(form.files, form.names, fields + form.fields)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    is_file: bool = False
    chunks: list[memoryview] = field(default_factory=list)
    size: int = 0


class FormReader:
    """python-multipart's streaming parser, fed the body as it arrives; file parts are kept as
    views of the received chunks until the part ends, then joined once."""

    def __init__(self, boundary: bytes, max_files: int) -> None:
        self.max_files = max_files
        self.files: list[bytes] = []
        self.names: list[str | None] = []
        self.fields: list[tuple[str, str]] = []
        self.ended = False
        self._part = _Part()
        self._header_field = b""
        self._header_value = b""
        self.parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    def _begin(self) -> None:
        self._part = _Part()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part.headers[self._header_field.strip().lower()] = self._header_value.strip()
        self._header_field = self._header_value = b""

    def _on_headers_finished(self) -> None:
        part = self._part
        disposition, options = parse_options_header(part.headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise malformed("each part needs a `Content-Disposition: form-data; name=...` header")
        part.name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            part.filename = options[b"filename"].decode("utf-8", "replace")
        mime = part.headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        # A file: a part with a filename, or one whose type says it is an image.
        part.is_file = part.filename is not None or body_kind(mime.decode("latin-1")) == RAW
        if part.is_file and len(self.files) >= self.max_files:
            raise ApiError(
                ErrorType.VALIDATION,
                f"batch size > maximum allowed batch size {self.max_files}: the form has more "
                f"than {self.max_files} files",
            )
        if not part.is_file and len(self.fields) >= MAX_FIELDS:
            raise ApiError(ErrorType.VALIDATION, f"the form has more than {MAX_FIELDS} fields")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if not part.is_file and part.size > MAX_FIELD_BYTES:
            raise ApiError(
                ErrorType.VALIDATION,
                f"form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes (a text field "
                "is an option; an image is a part with a filename)",
            )
        part.chunks.append(memoryview(data)[start:end])

    def _on_part_end(self) -> None:
        part, self._part = self._part, _Part()
        if part.is_file:
            self.files.append(b"".join(part.chunks))
            self.names.append(part.filename or None)
            return
        try:
            self.fields.append((part.name, b"".join(part.chunks).decode("utf-8")))
        except UnicodeDecodeError:
            raise ApiError(
                ErrorType.VALIDATION, f"form field {part.name!r} is not valid UTF-8"
            ) from None

    def _on_end(self) -> None:
        self.ended = True

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except FormParserError as exc:
            raise malformed(str(exc)) from None


def malformed(reason: str) -> ApiError:
    return ApiError(ErrorType.VALIDATION, f"malformed multipart/form-data body: {reason}")


async def read_form(request: Request, max_files: int) -> FormReader:
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise malformed("the Content-Type has no boundary parameter")
    try:
        reader = FormReader(boundary, max_files)
    except FormParserError as exc:  # a boundary longer than the parser takes
        raise malformed(str(exc)) from None
    async for chunk in request.stream():
        if chunk and not reader.ended:  # an epilogue after the closing boundary is ignored
            reader.write(chunk)
    if not reader.ended:
        raise malformed("the body ends before the closing boundary")
    return reader


def upload_options(fields: list[tuple[str, str]], model: type[M]) -> M:
    """The options of a raw upload as `model` (the route's JSON body, without its inputs):
    the same fields, checked the same way; a text boolean is exactly `true` or `false`."""
    allowed = sorted(set(model.model_fields) - {"inputs"})
    given: dict[str, object] = {}
    for name, value in fields:
        if name not in allowed:
            raise ApiError(
                ErrorType.VALIDATION,
                f"unknown option {name!r}: a raw upload takes {', '.join(allowed)}",
            )
        if name in given:
            raise ApiError(ErrorType.VALIDATION, f"{name}: given more than once")
        given[name] = typed(value, base_types(model.model_fields[name].annotation))
    try:
        return model.model_validate({"inputs": [], **given})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from None


def typed(value: str, kinds: set[Any]) -> object:
    """A text option as its field's type reads it: `true`/`false` for a boolean, digits for a
    count; any other text stays text (a string field keeps `true`; the field refuses the rest)."""
    if bool in kinds and value in TEXT_BOOLEANS:
        return TEXT_BOOLEANS[value]
    if int in kinds and TEXT_COUNT.fullmatch(value):
        return int(value)
    return value


def base_types(annotation: Any) -> set[Any]:
    """The plain types in a field's annotation: `StrictBool | None` -> {bool, NoneType}."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return base_types(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return {kind for arg in typing.get_args(annotation) for kind in base_types(arg)}
    return {annotation}
