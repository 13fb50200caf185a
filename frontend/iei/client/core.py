"""The client's one implementation, without I/O: request building, batching, retries and error
mapping are generators ("plans") that yield what they need done — send a request, wait, encode
images — and are sent back the result. `IEIClient` carries the steps out with blocking calls,
`AsyncIEIClient` with awaits; nothing else differs between the two.
"""

from __future__ import annotations

import base64
import copy
import random
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeAlias, TypeVar

import httpx
import numpy as np
import orjson

from .errors import (
    RETRIED_STATUSES,
    BackendError,
    IEIError,
    UnavailableError,
    error_from_response,
)
from .inputs import ImageFile, ImageInput, encode_image, image_file, multipart_form

T = TypeVar("T")

# Share of the server's payload limit one request may fill (JSON or form framing is the rest).
PAYLOAD_SHARE = 0.9
# Seconds an answer is waited for, unless the client is given its own timeout: before /info is
# read, and past the server's own request timeout (IEI_REQUEST_TIMEOUT, in /info) once it is.
DEFAULT_TIMEOUT = 120.0
ANSWER_MARGIN = 30.0
# Transport errors that another try cannot mend: a URL without http(s), a header httpx refuses.
NOT_RETRIED = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)
JSON_TYPE = "application/json"


@dataclass(frozen=True)
class Send:
    """Send this request; the plan gets the `httpx.Response`, or the `httpx.TransportError`."""

    method: str
    path: str
    body: bytes | None = None
    content_type: str = JSON_TYPE
    timeout: float | None = None  # seconds to wait for the answer (None: the client's)

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Content-Type": self.content_type} if self.body is not None else None


@dataclass(frozen=True)
class Wait:
    """Sleep this long (back-off before a retry); the plan gets None."""

    seconds: float


@dataclass(frozen=True)
class Encode:
    """Turn these inputs into what the server takes (CPU work: the async client runs it in a
    thread); the plan gets the list: the files themselves (`raw`: a server that takes uploads,
    and no URL among them), else base64 strings."""

    images: Sequence[ImageInput]
    raw: bool = False

    def run(self) -> Sequence[str | ImageFile]:
        if not self.raw:
            return [encode_image(image) for image in self.images]
        files = [image_file(image) for image in self.images]
        if any(isinstance(file, str) for file in files):  # URLs go in JSON, and the files with them
            return [f if isinstance(f, str) else base64.b64encode(f.data).decode() for f in files]
        return files


Step: TypeAlias = Send | Wait | Encode
Plan: TypeAlias = Generator[Step, Any, T]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before retrying 429, 503, a 504 that carries
    `Retry-After` (a model still loading) and lost connections.

    The wait before retry n (1, 2, …) is `backoff * 2**(n-1)` with ±25 % jitter (so that many
    clients do not retry in step), never less than the server's `Retry-After` (plus up to 25 %):
    the server's hint is a floor, not the whole wait, so that the retries still span a Triton
    restart when every answer says "1 s". Never more than `max_backoff`: an answer whose
    `Retry-After` is longer (a model that failed to load: minutes) is raised at once, not retried
    sooner than the server said. `attempts` counts every try, the first included.
    """

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        jitter = random.uniform(0.75, 1.25)  # noqa: S311 (back-off jitter)
        wait = self.backoff * 2 ** (retry - 1) * jitter
        if retry_after is not None:
            wait = max(wait, retry_after * max(1.0, jitter))
        return min(wait, self.max_backoff)


def retried(status: int, retry_after: float | None) -> bool:
    """Whether an answer is worth another try: 429 and 503, and a 504 that says when (a model
    loading on demand past the request's timeout goes on loading); another 504 is an inference
    that ran out of time, which a retry would only repeat."""
    return status in RETRIED_STATUSES or (status == 504 and retry_after is not None)


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last may be shorter), taken from the iterable only as
    each list is asked for."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def chunks(
    encoded: Sequence[str | ImageFile], max_items: int, max_chars: int | None
) -> Iterator[range]:
    """Index ranges of at most `max_items` inputs and (where possible) `max_chars` characters."""
    start, size = 0, 0
    for index, item in enumerate(encoded):
        full = index - start >= max_items
        too_large = max_chars is not None and index > start and size + len(item) > max_chars
        if full or too_large:
            yield range(start, index)
            start, size = index, 0
        size += len(item)
    if start < len(encoded):
        yield range(start, len(encoded))


@dataclass(frozen=True)
class Form:
    """A `multipart/form-data` body, ready to send."""

    content: bytes
    content_type: str


def embed_body(inputs: list[str | ImageFile], options: dict[str, Any]) -> object:
    """One /embed request: image files as a form (options as its text fields, booleans as
    `true`/`false`), anything else as TEI's JSON."""
    if inputs and isinstance(inputs[0], ImageFile):
        fields = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
        files = [item for item in inputs if isinstance(item, ImageFile)]
        return Form(*multipart_form(files, fields))
    return {"inputs": inputs, **options}


DEFAULT_TEMPLATE = "This is a photo of {}."  # /classify's default, as in Hugging Face's API
MAX_FORM_FIELD = 1000  # bytes of a form's text field the server takes (1024), with room to spare
LabelScores: TypeAlias = list[dict[str, Any]]  # [{"label", "score"}], highest score first


def classify_body(
    inputs: list[str | ImageFile], labels: list[str], template: str, model: str | None
) -> object:
    """One /classify request: image files as a form (the labels one comma-separated field),
    anything else as Hugging Face's JSON."""
    model_field = {"model": model} if model is not None else {}
    if inputs and isinstance(inputs[0], ImageFile):
        fields = {"candidate_labels": ",".join(labels), "hypothesis_template": template}
        files = [item for item in inputs if isinstance(item, ImageFile)]
        return Form(*multipart_form(files, {**fields, **model_field}))
    parameters = {"candidate_labels": labels, "hypothesis_template": template}
    return {"inputs": inputs, "parameters": parameters, **model_field}


def form_takes(labels: list[str], template: str) -> bool:
    """Whether the labels fit a form's fields: no comma in a label, short enough."""
    joined = ",".join(labels)
    fits = max(len(joined.encode()), len(template.encode())) <= MAX_FORM_FIELD
    return fits and not any("," in label for label in labels)


def as_matrix(vectors: list[np.ndarray], dimension: int | None) -> np.ndarray:
    if not vectors:
        return np.zeros((0, dimension or 0), dtype=np.float32)
    return np.concatenate(vectors, axis=0)


def facts_of(info: dict[str, Any], model: str | None) -> dict[str, Any]:
    """What /info says of `model` (a served name or id; None: the default, /info's own fields)."""
    if model is None:
        return info
    for entry in info.get("models") or []:
        if model in (entry.get("name"), entry.get("model_id")):
            return dict(entry)
    return {}


def json_of(response: httpx.Response) -> Any:
    """A successful answer's JSON; an IEIError when it is none (`--url` names another server)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        try:
            where = str(response.request.url)
        except RuntimeError:  # a response built without its request
            where = "the service"
        raise IEIError(
            f"{where} answered {response.status_code} with something that is not JSON "
            f"({response.headers.get('content-type', 'no content type')}): is it IEI?"
        ) from None


def vectors_from(response: httpx.Response) -> np.ndarray:
    return np.asarray(json_of(response), dtype=np.float32)


class ClientCore:
    """What a client knows (the service, its key, its limits once read) and the plans of its
    calls."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float | None,
        retry: RetryPolicy,
        batch_size: int | None,
        model: str | None = None,
    ) -> None:
        if retry.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be at least 1")
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout  # None: the server's request timeout, with a margin
        self.retry = retry
        self.batch_size = batch_size
        self.model = model  # the served model every call names (None: the server's default)
        self.server_info: dict[str, Any] | None = None

    def for_model(self, model: str | None) -> ClientCore:
        """This core, or a copy of it naming `model` (the server's facts shared)."""
        if model is None or model == self.model:
            return self
        core = copy.copy(self)
        core.model = model
        return core

    def limits(self) -> tuple[int, int | None, int | None]:
        """(images per request, characters per request, embedding dimension) from /info."""
        info = self.server_info or {}
        limits = info.get("limits") or {}
        per_request = int(
            info.get("max_client_batch_size") or limits.get("max_client_batch_size") or 32
        )
        if self.batch_size is not None:
            per_request = max(1, min(per_request, self.batch_size))
        payload = limits.get("payload_limit")
        max_chars = int(payload * PAYLOAD_SHARE) if payload else None
        return per_request, max_chars, facts_of(info, self.model).get("embedding_dimension")

    def answer_timeout(self) -> float:
        """Seconds to wait for an answer: the client's own timeout, else the server's request
        timeout (once /info is read) and a margin for the answer to come back. A fixed 120 s
        gave up on a server allowed longer (IEI_REQUEST_TIMEOUT up to an hour)."""
        if self.timeout is not None:
            return self.timeout
        limits = (self.server_info or {}).get("limits") or {}
        server = limits.get("request_timeout")
        return float(server) + ANSWER_MARGIN if server else DEFAULT_TIMEOUT

    def info(self) -> Plan[dict[str, Any]]:
        """`GET /info`, asked once and kept."""
        if self.server_info is None:
            response = yield from self.request("GET", "/info")
            self.server_info = json_of(response)
        return self.server_info

    def embed(self, images: Iterable[ImageInput], normalize: bool) -> Plan[np.ndarray]:
        """Vectors of `images` as float32 (N, D): requests within the server's limits, in order.

        Each request's inputs are read and encoded just before it is sent, so a client holds
        one request's worth of base64 however many images it is given (a generator too)."""
        info = yield from self.info()
        per_request, _, dimension = self.limits()
        parts = []
        for batch in batches(images, per_request):
            encoded: list[str | ImageFile] = yield Encode(batch, raw=bool(info.get("raw_uploads")))
            parts.extend((yield from self.send_inputs(encoded, {"normalize": normalize})))
        return as_matrix(parts, dimension)

    def classify(
        self, images: Iterable[ImageInput], labels: Sequence[str], template: str
    ) -> Plan[list[LabelScores]]:
        """Per image, in order, `[{"label", "score"}]` highest first: the model's own zero-shot
        scores (POST /classify) of each label put into `template` at `{}`."""
        if isinstance(labels, str):
            raise TypeError("labels is a list of labels, not one str")
        labels = list(labels)
        for label in labels:
            if not isinstance(label, str):
                raise TypeError(f"labels must be str, not {type(label).__name__}")
        info = yield from self.info()
        per_request, max_chars, _ = self.limits()
        raw = bool(info.get("raw_uploads")) and form_takes(labels, template)
        results: list[LabelScores] = []
        for batch in batches(images, per_request):
            encoded: list[str | ImageFile] = yield Encode(batch, raw=raw)
            for span in chunks(encoded, per_request, max_chars):
                body = classify_body([encoded[i] for i in span], labels, template, self.model)
                response = yield from self.request("POST", "/classify", body)
                results.extend(json_of(response))
        return results

    def embed_texts(
        self, texts: Sequence[str], normalize: bool, truncate: bool
    ) -> Plan[np.ndarray]:
        """Vectors of `texts` in the image space of a dual encoder (CLIP, SigLIP, SigLIP2), as
        float32 (N, D); a text over the model's context is cut to it unless `truncate` is false
        (then the server refuses it)."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of texts, not one str")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be str, not {type(text).__name__}")
        options = {"modality": "text", "normalize": normalize, "truncate": truncate}
        return (yield from self.embed_inputs(list(texts), options))

    def embed_inputs(
        self, inputs: Sequence[str | ImageFile], options: dict[str, Any]
    ) -> Plan[np.ndarray]:
        """POST /embed in requests within the server's limits (inputs and payload), in order."""
        yield from self.info()
        return as_matrix((yield from self.send_inputs(inputs, options)), self.limits()[2])

    def send_inputs(
        self, inputs: Sequence[str | ImageFile], options: dict[str, Any]
    ) -> Plan[list[np.ndarray]]:
        """POST /embed of `inputs` in requests within the server's limits; their vectors."""
        per_request, max_chars, _ = self.limits()
        if self.model is not None:
            options = {**options, "model": self.model}
        parts = []
        for span in chunks(inputs, per_request, max_chars):
            body = embed_body([inputs[i] for i in span], options)
            response = yield from self.request("POST", "/embed", body)
            parts.append(vectors_from(response))
        return parts

    def request(self, method: str, path: str, body: object = None) -> Plan[httpx.Response]:
        """One call (a JSON body, or a `Form`), retried on 429, 503, a 504 with `Retry-After`
        and lost connections; other errors raise at once."""
        content: bytes | None = None
        content_type = JSON_TYPE
        if isinstance(body, Form):
            content, content_type = body.content, body.content_type
        elif body is not None:
            content = orjson.dumps(body)
        for attempt in range(1, self.retry.attempts + 1):
            error: IEIError
            timeout = self.answer_timeout()
            outcome = yield Send(method, path, content, content_type, timeout)
            if isinstance(outcome, httpx.ReadTimeout):  # sent again, it would only run again
                raise BackendError(
                    f"{self.url}{path} gave no answer within {timeout:g} s (the client's timeout)"
                )
            if isinstance(outcome, NOT_RETRIED):
                raise IEIError(f"cannot call {self.url}{path}: {outcome}")
            if isinstance(outcome, httpx.TransportError):
                error = UnavailableError(f"cannot reach {self.url}: {outcome!r}")
            elif outcome.is_success:
                return outcome
            else:
                error = error_from_response(outcome)
                if not retried(outcome.status_code, error.retry_after):
                    raise error
                if (error.retry_after or 0) > self.retry.max_backoff:
                    raise error  # later than this client waits: not sooner than it says
            if attempt == self.retry.attempts:
                raise error
            yield Wait(self.retry.delay(attempt, error.retry_after))
        raise AssertionError("unreachable")
