"""Prometheus metrics of the frontend (Triton's own stay on its metrics port).

With several uvicorn workers each one is a process: `iei serve` sets PROMETHEUS_MULTIPROC_DIR, and
/metrics then adds up the files that all workers write (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter("iei_requests", "HTTP requests by route and status.", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "iei_request_duration_seconds", "Time to answer a request.", ["route"], buckets=LATENCY_BUCKETS
)
IN_FLIGHT = Gauge(
    "iei_requests_in_flight", "Requests being answered now.", multiprocess_mode="livesum"
)
# `model`: the served model's name (IEI_MODELS; the one model's name otherwise).
IMAGES = Counter("iei_images_embedded", "Images turned into embeddings.", ["model"])
TEXTS = Counter("iei_texts_embedded", "Texts turned into embeddings (dual encoders).", ["model"])
IMAGES_PER_REQUEST = Histogram(
    "iei_images_per_request", "Images in one embedding request.", ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)  # fmt: skip
# The content cache (IEI_CACHE_MB): inputs answered from it (a repeat within one request too), and
# inputs sent to Triton, by model and modality (image, text). Nothing counted with the cache off.
CACHE_HITS = Counter(
    "iei_cache_hits", "Inputs whose vector came from the content cache.", ["model", "modality"]
)
CACHE_MISSES = Counter(
    "iei_cache_misses", "Inputs not in the content cache, sent to Triton.", ["model", "modality"]
)
# Loading on demand (IEI_MODEL_IDLE_UNLOAD): loads a request waited for, by outcome (loaded,
# failed); unloads of idle models (counted by `iei serve`, which decides them).
MODEL_LOADS = Counter(
    "iei_model_loads", "Models loaded on demand for a request.", ["model", "outcome"]
)
MODEL_UNLOADS = Counter("iei_model_unloads", "Idle models unloaded.", ["model"])
# Models unloaded by the frontend to load another within IEI_MAX_LOADED_MODELS.
MODEL_EVICTIONS = Counter(
    "iei_model_evictions", "Models unloaded to make room for another.", ["model"]
)
# Restarts of Triton by `iei serve`'s supervisor, by why: `exited` (Triton died), `stub_died` (a
# model's Python stub died), `stub_hung` (an instance in one execution computed nothing for a
# minute: a deadlock), `probes_failed` (the model failed its probes: stuck in errors, hung).
TRITON_RESTARTS = Counter("iei_triton_restarts", "Triton restarts by iei serve.", ["reason"])
# Inference calls to Triton that carry files (images, texts), by how the files went: `body` (the
# HTTP request) or `shared_memory` (the worker's region, IEI_TRITON_SHM_MB, when Triton sees it).
TRITON_FILE_CALLS = Counter(
    "iei_triton_file_calls", "Inference calls to Triton by how their files went.", ["transport"]
)
TRITON_SECONDS = Histogram(
    "iei_triton_round_trip_seconds", "Time of one inference call to Triton (a chunk of images).",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip


def render() -> tuple[bytes, str]:
    """The exposition text: this process's metrics, or every worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def worker_exited(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
