"""Bulk embedding on Ray Data, for pipelines of your own (`iei embed --ray` is built on it).

    import ray, iei.ray
    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    vectors = iei.ray.embed_dataset(ds, model="google/vit-base-patch16-224", actors=4)
    vectors.write_parquet("s3://bucket/vectors/")

`embed_dataset` runs `ModelEmbedder` (the model inside Ray's actors, with the Triton model's own
loading, preprocessing and pooling: the server's vectors) or `ServiceEmbedder` (Ray's actors call
a running IEI service) over a dataset with a `bytes` column, or a `path` column alone, and adds
`embedding` (float32 list, null for an image that has none), `sha256` and `error`. The classes go
straight into `Dataset.map_batches(..., batch_format="pyarrow")` where more control is wanted.

Needs the `ray` extra (`pip install 'iei[ray]'`); the model mode also the model's runtime (torch,
transformers: the `serve` extra). Nothing else in `iei` imports this package.
"""

from __future__ import annotations

from typing import Any

from .actors import BatchEmbedder, ModelEmbedder, ServiceEmbedder

__all__ = ["BatchEmbedder", "ModelEmbedder", "ServiceEmbedder", "embed_dataset"]


def embed_dataset(
    ds: Any,
    *,
    model: str | None = None,
    url: str | None = None,
    actors: int = 1,
    batch_size: int = 16,
    normalize: bool = True,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    threads: int | None = None,
    dtype: str | None = None,
    pooling: str | None = None,
    api_key: str | None = None,
    in_flight: int = 4,
    retries: int = 4,
    served_model: str | None = None,
) -> Any:
    """`ds` (a `ray.data.Dataset` with `bytes` or `path`) with each image's vector.

    model mode: `actors` actors, each with the model; `num_gpus` each (default: 1 where the
    cluster has GPUs, else 0) and `num_cpus` each (default: `threads` on a CPU, else 1), `threads`
    torch threads on a CPU (default: `num_cpus`). url mode: `actors` actors with `in_flight`
    requests each (so `actors * in_flight` at most in all) of `batch_size` images, to the
    service's `served_model` (a name of its `GET /v1/models`; None: its default).
    """
    import ray.data

    if (model is None) == (url is None):
        raise ValueError("embed_dataset needs model= or url=, not both")
    if model is not None:
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        if num_cpus is None:
            num_cpus = 1 if num_gpus else float(threads or 1)
        if threads is None and not num_gpus:
            threads = max(1, int(num_cpus))
        embedder: type[BatchEmbedder] = ModelEmbedder
        arguments: dict[str, Any] = {
            "model": model, "normalize": normalize, "dtype": dtype, "pooling": pooling,
            "threads": threads,
        }  # fmt: skip
    else:
        # Sending requests and reading answers: light work, most of it waiting.
        num_cpus = 0.5 if num_cpus is None else num_cpus
        num_gpus = 0
        embedder = ServiceEmbedder
        arguments = {
            "url": url, "api_key": api_key, "normalize": normalize, "batch_size": batch_size,
            "in_flight": in_flight, "retries": retries, "model": served_model,
        }  # fmt: skip
    return ds.map_batches(
        embedder,
        fn_constructor_kwargs=arguments,
        # url mode: enough images per call for `in_flight` requests of `batch_size`
        batch_size=batch_size * (in_flight if url is not None else 1),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
