"""`POST /embed` (and TEI's root route, `POST /`): images or texts in, vectors out
(text-embeddings-inference's contract). Besides TEI's JSON body, images also come as raw uploads:
the body is the image file, or a `multipart/form-data` form of several (see `uploads.py`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response

from ..dependencies import Authorized, ServicesDep, require_api_key
from ..embedding import (
    IMAGE,
    TEXT,
    Embedded,
    Input,
    Services,
    check_dimensions_early,
    embed_inputs,
    first_dimensions,
    normalize_rows,
)
from ..errors import ApiError, ErrorType
from ..responses import VectorResponse
from ..routing import OffLoopJSONRoute
from ..schemas import UPLOAD_OPENAPI, EmbedRequest
from ..uploads import JSON, body_kind, read_upload, unsupported_type, upload_options

UploadHandler = Callable[[Request, str, Services], Awaitable[Response]]


def upload_route(upload: UploadHandler) -> type[OffLoopJSONRoute]:
    """A route class by Content-Type: JSON bodies go to FastAPI's handler (parsed and validated
    against the route's body model); raw uploads to `upload`, before FastAPI would try to read
    them as JSON; any other Content-Type is a 415. /embed's and /classify's."""

    class UploadRoute(OffLoopJSONRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            json_handler = super().get_route_handler()

            async def by_content_type(request: Request) -> Response:
                content_type = request.headers.get("content-type")
                kind = body_kind(content_type)
                if kind == JSON:
                    if request.query_params:  # a raw upload's options: silently ignored here
                        raise query_with_json(request)
                    return await json_handler(request)
                services: Services = request.app.state.services
                require_api_key(request, services)  # FastAPI's dependencies run for JSON only
                if kind is None:
                    raise unsupported_type(content_type)
                return await upload(request, kind, services)

            return by_content_type

    return UploadRoute


def query_with_json(request: Request) -> ApiError:
    """A JSON body with query parameters: they are a raw upload's options, and a JSON body's
    options are in the body; ignoring `?model=...` would answer with another model's vectors."""
    names = ", ".join(sorted(set(request.query_params)))
    return ApiError(
        ErrorType.VALIDATION,
        f"query parameters ({names}) are the options of a raw upload: "
        "with a JSON body, give them in the body",
    )


router = APIRouter(
    tags=["embeddings"],
    dependencies=[Authorized],
    route_class=upload_route(lambda *args: embed_upload(*args)),  # defined below
)


@router.post(
    "/embed",
    response_class=VectorResponse,
    responses={
        200: {"content": {"application/json": {"example": [[0.01, -0.02, 0.03]]}}},
        415: {"description": "A Content-Type that /embed does not take"},
    },
    summary="Embed images or texts (TEI)",
    openapi_extra=UPLOAD_OPENAPI,
)
# TEI answers its root route as /embed; huggingface_hub's InferenceClient(model=URL) posts there.
@router.post("/", response_class=VectorResponse, include_in_schema=False)
async def embed(body: EmbedRequest, services: ServicesDep) -> VectorResponse:
    """One vector per input, in input order. The body is TEI's JSON, or a raw upload: the image
    file itself (`Content-Type: image/*` or `application/octet-stream`), or a
    `multipart/form-data` form whose file parts are the images, in order. A raw upload's options
    are query parameters (`?normalize=false`), in a form also text fields."""
    if body.modality == TEXT and (body.truncation_direction or "right").lower() == "left":
        raise ApiError(
            ErrorType.VALIDATION,
            "truncation_direction left is not supported: texts are cut at their end (right)",
        )
    started = time.perf_counter()
    model = services.models.resolve(body.model)
    await check_dimensions_early(services, model, body.dimensions)
    items = [Input(body.modality, value) for value in body.input_list]
    result = await embed_inputs(
        items, services, started, truncate=body.truncate is not False, model=model
    )
    return answer(result, body)


def answer(result: Embedded, options: EmbedRequest) -> VectorResponse:
    """The vectors of /embed: their first `dimensions` components, then normalised if asked."""
    vectors = first_dimensions(result.vectors, options.dimensions)
    vectors = normalize_rows(vectors) if options.normalize else vectors
    return VectorResponse(vectors, headers=result.timing_headers())


async def embed_upload(request: Request, kind: str, services: Services) -> VectorResponse:
    """`embed` for a raw upload: the same answer, the files sent to Triton as they came."""
    upload = await read_upload(request, kind, services.settings.max_client_batch_size)
    options = upload_options(upload.fields, EmbedRequest)
    if options.modality != IMAGE:
        raise ApiError(
            ErrorType.VALIDATION,
            "a raw upload is images: send texts as JSON (`modality: text`)",
        )
    started = time.perf_counter()
    model = services.models.resolve(options.model)
    await check_dimensions_early(services, model, options.dimensions)
    items = [
        Input(IMAGE, data, name) for data, name in zip(upload.files, upload.names, strict=True)
    ]
    return answer(await embed_inputs(items, services, started, model=model), options)
