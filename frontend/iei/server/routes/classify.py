"""`POST /classify`: zero-shot image classification in Hugging Face's shape. The images come as
on `/embed`: in the JSON body (base64, data: URI, URL), or as a raw upload (the image file as the
body, or a `multipart/form-data` form of files) with the labels and options as query parameters
or form fields."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..classify import classify, ranked
from ..dependencies import Authorized, ServicesDep
from ..embedding import IMAGE, Input, Services
from ..errors import ApiError, ErrorType
from ..responses import VectorResponse
from ..schemas import CLASSIFY_UPLOAD_OPENAPI, ClassifyRequest, ClassifyUploadOptions, LabelScore
from ..uploads import read_upload, upload_options
from .embed import upload_route

LABELS = "candidate_labels"

router = APIRouter(
    tags=["classification"],
    dependencies=[Authorized],
    route_class=upload_route(lambda *args: classify_upload(*args)),  # defined below
)


@router.post(
    "/classify",
    response_class=VectorResponse,
    response_model=list[LabelScore] | list[list[LabelScore]],
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": [{"label": "cat", "score": 0.91}, {"label": "dog", "score": 0.09}]
                }
            }
        },
        415: {"description": "A Content-Type that /classify does not take"},
    },
    summary="Zero-shot image classification (Hugging Face's shape)",
    openapi_extra=CLASSIFY_UPLOAD_OPENAPI,
)
async def classify_images(body: ClassifyRequest, services: ServicesDep) -> VectorResponse:
    """Each image scored against `parameters.candidate_labels`, each label put into
    `parameters.hypothesis_template` (default `This is a photo of {}.`), with the model's own
    zero-shot head: CLIP a softmax over the labels of `logit_scale · cosine`, SigLIP and SigLIP2
    a sigmoid of `logit_scale · cosine + logit_bias`. One image (a string): `[{"label",
    "score"}]`, highest score first; a list: one such list per image, in order. A raw upload
    gives the labels as `?candidate_labels=a,b` (or repeated) and always answers a list of
    lists, one per file."""
    model = services.models.resolve(body.model)
    params = body.parameters
    items = [Input(IMAGE, value) for value in body.input_list]
    scores, headers = await classify(
        items, params.candidate_labels, params.hypothesis_template, services, model,
        prefix="parameters.",
    )  # fmt: skip
    answer = ranked(params.candidate_labels, scores)
    return VectorResponse(answer[0] if isinstance(body.inputs, str) else answer, headers=headers)


async def classify_upload(request: Request, kind: str, services: Services) -> VectorResponse:
    """`classify_images` for a raw upload: the labels comma-separated or repeated."""
    upload = await read_upload(request, kind, services.settings.max_client_batch_size)
    given = [value for name, value in upload.fields if name == LABELS]
    fields = [(name, value) for name, value in upload.fields if name != LABELS]
    if given:  # repeated, or comma-separated, or both: one list
        fields.append((LABELS, ",".join(given)))
    options = upload_options(fields, ClassifyUploadOptions)
    if options.candidate_labels is None:
        raise ApiError(
            ErrorType.VALIDATION,
            f"{LABELS}: missing; a raw upload gives them as `?{LABELS}=cat,dog` (or a form field)",
        )
    labels = [label.strip() for label in options.candidate_labels.split(",")]
    model = services.models.resolve(options.model)
    files = zip(upload.files, upload.names, strict=True)
    items = [Input(IMAGE, data, name) for data, name in files]
    scores, headers = await classify(items, labels, options.hypothesis_template, services, model)
    return VectorResponse(ranked(labels, scores), headers=headers)
