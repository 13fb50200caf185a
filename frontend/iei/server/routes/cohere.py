"""`POST /v2/embed`: Cohere's v2 embed API, so that Cohere's SDKs work unchanged
(`cohere.ClientV2(api_key=IEI_API_KEY, base_url=URL)`). Errors answer Cohere's `{"message"}`."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter

from ..dependencies import Authorized, ServicesDep
from ..embedding import (
    IMAGE,
    TEXT,
    Input,
    check_dimensions_early,
    embed_inputs,
    first_dimensions,
    normalize_rows,
)
from ..errors import ApiError, ErrorType
from ..inputs import bit_depth
from ..logs import REQUEST_ID
from ..quantize import encode
from ..responses import VectorResponse
from ..routing import OffLoopJSONRoute
from ..schemas import CohereEmbedRequest, CohereEmbedResponse, CohereInput

router = APIRouter(tags=["embeddings"], dependencies=[Authorized], route_class=OffLoopJSONRoute)


def cohere_items(body: CohereEmbedRequest) -> list[Input]:
    """The request's inputs: exactly one of `texts`, `images` (data URIs), `inputs`."""
    given = [name for name in ("texts", "images", "inputs") if getattr(body, name) is not None]
    if len(given) != 1:
        raise ApiError(
            ErrorType.VALIDATION,
            "give exactly one of `texts`, `images` and `inputs`"
            + (f" (got {', '.join(given)})" if given else ""),
        )
    if body.texts is not None:
        if body.input_type == "image":
            raise ApiError(ErrorType.VALIDATION, "input_type `image` goes with `images`")
        return [Input(TEXT, text) for text in body.texts]
    if body.images is not None:
        return [Input(IMAGE, image) for image in body.images]
    return [input_of(item, index) for index, item in enumerate(body.inputs or [])]


def input_of(item: CohereInput, index: int) -> Input:
    """One content list of one part: a text, or an image URL (a data URI)."""
    if len(item.content) == 1:
        [part] = item.content
        if part.type == "text" and part.text is not None:
            return Input(TEXT, part.text)
        url = (
            part.image_url.url
            if part.image_url is not None and not isinstance(part.image_url, str)
            else part.image_url
        )
        if part.type == "image_url" and url is not None:
            return Input(IMAGE, url)
    raise ApiError(
        ErrorType.VALIDATION,
        f"inputs[{index}]: an input here is one part, a `text` or an `image_url`: these models "
        "embed texts and images apart (into one space), and do not fuse parts into one vector",
    )


@router.post(
    "/v2/embed", response_model=CohereEmbedResponse, summary="Embed images or texts (Cohere v2)"
)
async def cohere_embed(body: CohereEmbedRequest, services: ServicesDep) -> VectorResponse:
    """Cohere's embed: the vectors of each of `embedding_types` (quantised from the unit
    vectors, README's "Cohere's API"), with the images' sizes and formats."""
    started = time.perf_counter()
    model = services.models.resolve(body.model)
    items = cohere_items(body)
    if body.truncate == "START":
        raise ApiError(
            ErrorType.VALIDATION,
            "truncate START is not supported: texts are cut at their end (END), or refused (NONE)",
        )
    if body.max_tokens is not None:
        raise ApiError(
            ErrorType.VALIDATION,
            "max_tokens is not supported: a text is cut at the model's context (truncate END)",
        )
    await check_dimensions_early(services, model, body.output_dimension)
    result = await embed_inputs(
        items, services, started, truncate=body.truncate != "NONE", model=model
    )
    unit = normalize_rows(first_dimensions(result.vectors, body.output_dimension))
    kinds = body.embedding_types or ["float"]
    texts = [str(item.value) for item in items if item.modality == TEXT]
    content: dict[str, Any] = {
        "id": REQUEST_ID.get() or uuid.uuid4().hex,
        "embeddings": {kind: encode(unit, kind) for kind in dict.fromkeys(kinds)},
        "texts": texts,
        "images": [
            {
                "width": image.width,
                "height": image.height,
                "format": image.format.lower(),
                "bit_depth": bit_depth(image.mode),
            }
            for image in result.images
        ],
        "meta": {
            "api_version": {"version": "2"},
            "billed_units": {"images": len(result.images), "input_tokens": 0},
        },
        "response_type": "embeddings_by_type",
    }
    return VectorResponse(content, headers=result.timing_headers())
