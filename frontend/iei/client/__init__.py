"""Python client for an IEI service: images in, a float32 matrix out.

    with IEIClient("http://127.0.0.1:8000") as client:
        vectors = client.embed(["cat.jpg", Path("dog.png"), pil_image, numpy_array])

`AsyncIEIClient` is the same on asyncio. Both split a call into requests of at most the server's
`max_client_batch_size` images (read once from `GET /info`), retry 429 and 503 answers and lost
connections with exponential back-off (honouring `Retry-After`), and raise `IEIError` subclasses
that carry the server's `error_type`. The base package is enough: httpx, numpy, Pillow, no torch.
"""

from .async_client import AsyncIEIClient
from .core import RetryPolicy, chunks
from .errors import (
    AuthenticationError,
    BackendError,
    IEIError,
    OverloadedError,
    UnavailableError,
    ValidationError,
)
from .inputs import ImageInput, encode_image
from .sync_client import IEIClient

__all__ = [
    "AsyncIEIClient",
    "AuthenticationError",
    "BackendError",
    "IEIClient",
    "IEIError",
    "ImageInput",
    "OverloadedError",
    "RetryPolicy",
    "UnavailableError",
    "ValidationError",
    "chunks",
    "encode_image",
]
