"""The callable classes `Dataset.map_batches` runs in Ray's actors: images in, vectors out.

`ModelEmbedder` loads the model once per actor with the Triton model's own code (the model
repository's `iei_runtime`: loading, decoding, the image processor, pooling), so its vectors are
the server's. `ServiceEmbedder` calls an IEI service through the client (its retries and
back-off) with a bounded number of requests in flight. Both take a batch with a `bytes` column
(`ray.data.read_binary_files`) or a `path` column alone (the actor reads the files), and give
the batch back without `bytes`, with `embedding` (float32 list), `sha256` and `error` (null, or
why that image has no vector: one bad file never fails its batch).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from ..client.bulk import strip_index
from ..client.core import RetryPolicy
from ..client.errors import ValidationError
from ..client.sync_client import IEIClient
from .files import read_files

EMBEDDING_TYPE = pa.list_(pa.float32())
RESULT_COLUMNS = ("embedding", "sha256", "error")

# What an image becomes: its vector, or the reason it has none.
Result = np.ndarray | str


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """The frontend's normalisation (`iei.server.embedding.normalize_rows`, which this part cannot
    import): unit L2 norm per row, an all-zero vector stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.finfo(np.float32).tiny)


def as_table(batch: Any) -> pa.Table:
    """A batch in any of Ray's formats (pyarrow, a dict of columns, pandas) as a pyarrow Table."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table({name: list(column) for name, column in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)


class BatchEmbedder:
    """What both actors share: the batch's columns in and out; `embed` is each one's own."""

    normalize = False  # whether __call__ normalises (the service normalises on its side)

    def embed(self, blobs: Sequence[bytes]) -> list[Result]:
        raise NotImplementedError

    def __call__(self, batch: Any) -> pa.Table:
        table = as_table(batch)
        columns = set(table.column_names)
        if "bytes" in columns:
            blobs = [bytes(b) if b is not None else b"" for b in table.column("bytes").to_pylist()]
            digests = (
                table.column("sha256").to_pylist()
                if "sha256" in columns
                else [hashlib.sha256(b).hexdigest() for b in blobs]
            )
            errors = (
                table.column("error").to_pylist() if "error" in columns else [None] * len(blobs)
            )
        elif "path" in columns:  # paths alone: read them here
            reads = list(read_files(table.column("path").to_pylist()))
            blobs = [r.content for r in reads]
            digests = [r.sha256 for r in reads]
            errors = [r.error for r in reads]
        else:
            raise ValueError(f"a batch needs a `bytes` or a `path` column, not {sorted(columns)}")
        todo = [i for i, error in enumerate(errors) if error is None]
        vectors: list[np.ndarray | None] = [None] * len(blobs)
        results = self.embed([blobs[i] for i in todo]) if todo else []
        good = [(i, r) for i, r in zip(todo, results, strict=True) if not isinstance(r, str)]
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, str):
                errors[i] = result
        if good:
            matrix = np.stack([r for _, r in good]).astype(np.float32, copy=False)
            if self.normalize:
                matrix = normalize_rows(matrix)
            for (i, _), vector in zip(good, matrix, strict=True):
                vectors[i] = vector
        kept = table.drop_columns([c for c in ("bytes", *RESULT_COLUMNS) if c in columns])
        return (
            kept.append_column("embedding", embedding_array(vectors))
            .append_column("sha256", pa.array(digests, pa.string()))
            .append_column("error", pa.array(errors, pa.string()))
        )


def embedding_array(vectors: Sequence[np.ndarray | None]) -> pa.Array:
    """float32 lists, null where an image has no vector."""
    return pa.array([None if v is None else v.tolist() for v in vectors], EMBEDDING_TYPE)


# --- the model in the actor ----------------------------------------------------------------------


def model_repository() -> Path:
    """IEI's model repository: inside the package in a wheel, beside `frontend/` in a checkout
    (as `iei.launcher.repository.shipped_model_repository` finds it, without its imports)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "model_repository"
    return packaged if packaged.is_dir() else package.parents[1] / "model_repository"


def model_runtime() -> SimpleNamespace:
    """The Triton model's own code (`iei_runtime`), imported as the model imports it: from the
    repository's top folder. Needs torch and transformers (the `serve` extra)."""
    top = str(model_repository())
    if top not in sys.path:
        sys.path.insert(0, top)
    from iei_runtime import loading, resources, settings

    return SimpleNamespace(
        read_settings=settings.read_settings,
        load_embedder=loading.load_embedder,
        available_cores=resources.available_cores,
    )


class ModelEmbedder(BatchEmbedder):
    """The model, loaded once per actor as a Triton instance loads it (`load_embedder`: the
    model's processor, the pooling of IEI_POOLING, the dtype of IEI_DTYPE, a warm-up).

    `threads`: the torch and decode threads of a CPU actor (default: this machine's cores), the
    forward pass on all of them unless IEI_FORWARD_THREADS says otherwise: an actor decodes and
    then runs the pass, so a thread the pass leaves out would idle (a server's fewer, `auto`,
    leave a core to its other processes); on a GPU (Ray's `num_gpus=1` makes it this process's
    `cuda:0`) decoding uses every core.
    `dtype`, `pooling`: IEI_DTYPE and IEI_POOLING (default: the environment's, else auto).
    """

    def __init__(
        self,
        model: str,
        *,
        normalize: bool = True,
        dtype: str | None = None,
        pooling: str | None = None,
        threads: int | None = None,
    ) -> None:
        import torch

        runtime = model_runtime()
        environ = {**os.environ, "IMAGE_EMBEDDING_MODEL": model}
        environ.update({k: v for k, v in (("IEI_DTYPE", dtype), ("IEI_POOLING", pooling)) if v})
        if torch.cuda.is_available():
            device = torch.device("cuda", 0)
            torch.cuda.set_device(device)  # as a Triton GPU instance does
            threads = threads or runtime.available_cores()
        else:
            device = torch.device("cpu")
            threads = threads or runtime.available_cores()
            torch.set_num_threads(threads)
            if not environ.get("IEI_FORWARD_THREADS"):  # unset or empty: all of them
                environ["IEI_FORWARD_THREADS"] = str(threads)
        self.normalize = normalize
        # The threads Ray gives the actor count as its cores (IEI_FORWARD_THREADS' bound).
        cores = max(threads, runtime.available_cores())
        settings = runtime.read_settings({}, environ, cores)
        self.embedder = runtime.load_embedder(settings, device, threads)

    def embed(self, blobs: Sequence[bytes]) -> list[Result]:
        return [str(r) if isinstance(r, ValueError) else r for r in self.embedder.embed(blobs)]


# --- a service behind the actor ----------------------------------------------------------------


class ServiceEmbedder(BatchEmbedder):
    """An IEI service (`url`) called by the client: requests of `batch_size` images, at most
    `in_flight` of them at once from this actor, 429/503 and lost connections retried with
    back-off (`retries` times). An image the service refuses (422) is retried alone, so that only
    the bad file gets an error; any other failure, after the retries, fails the batch. `model`:
    which of the service's models (None: its default)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        normalize: bool = True,
        batch_size: int = 16,
        in_flight: int = 4,
        retries: int = 4,
        timeout: float | None = None,
        model: str | None = None,
    ) -> None:
        self.remote_normalize = normalize
        self.batch_size = batch_size
        self.client = IEIClient(
            url, api_key, timeout=timeout, batch_size=batch_size,
            retry=RetryPolicy(attempts=max(0, retries) + 1), model=model,
        )  # fmt: skip
        self.pool = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="iei-request")

    def embed(self, blobs: Sequence[bytes]) -> list[Result]:
        results: list[Result] = [""] * len(blobs)

        def request(indices: Sequence[int]) -> None:
            try:
                vectors = self.client.embed(
                    [blobs[i] for i in indices], normalize=self.remote_normalize
                )
            except ValidationError as exc:
                if len(indices) == 1:
                    results[indices[0]] = strip_index(exc.message)
                    return
                for i in indices:  # find the bad one(s)
                    request([i])
                return
            for i, vector in zip(indices, vectors, strict=True):
                results[i] = vector

        size = self.batch_size
        requests = [range(s, min(s + size, len(blobs))) for s in range(0, len(blobs), size)]
        for done in [self.pool.submit(request, r) for r in requests]:
            done.result()  # the first failure (after the client's retries) fails the batch
        return results

    def __del__(self) -> None:
        if hasattr(self, "pool"):  # not when __init__ failed
            self.pool.shutdown(wait=False)
            self.client.close()
