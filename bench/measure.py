"""The measurements: the model in this process, and clients of the served stack."""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Load:
    """One load measurement: images per second and request latencies."""

    path: str  # embed (HTTP /embed) or grpc (Triton directly)
    mode: str  # single: one image per request; large: many images per request
    concurrency: int
    per_request: int
    images: int
    seconds: float
    latencies_ms: list[float]
    body: str = "json"  # /embed's request body: json (base64), raw (the file), form (multipart)
    # Every image sent, the warm-up request's before the clock included: what CPU time taken
    # around the whole load is divided by.
    sent: int = 0

    @property
    def img_s(self) -> float:
        return self.images / self.seconds

    def row(self) -> dict[str, Any]:
        p50, p95, p99 = np.percentile(self.latencies_ms, [50, 95, 99])
        row = asdict(self)
        del row["latencies_ms"]
        return {**row, "img_s": self.img_s, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def thread_cpu_per_call(fn: Callable[[], object], repeat: int) -> float:
    """CPU seconds of this thread per call of `fn`, after one call to warm it up (run it with
    torch on one thread: other threads' work is not counted)."""
    fn()
    start = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - start) / repeat


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call of `fn`, after one call to warm it up."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


# --- in-process ----------------------------------------------------------------------------


def forward_limit(embedder: Any, inputs: Mapping[str, Any], batch: int, images: int) -> float:
    """Inputs per second of the service's own forward pass (and pooling) on preprocessed
    batches of `batch` (`inputs`: the processor's or tokenizer's tensors by name), each one pass
    (not cut into the service's sub-batches nor split by its pass plan), nothing else: the
    ceiling of what serving can reach."""
    import torch

    count = len(next(iter(inputs.values())))
    index = torch.arange(batch) % count
    rows = {name: tensor[index] for name, tensor in inputs.items()}
    sub_batch = getattr(embedder, "forward_batch_size", None)
    plan = getattr(embedder, "pass_plan", None)  # the service's cuts of a pass (pass_plan.py)
    embedder.forward_batch_size, embedder.pass_plan = batch, {}
    try:
        # warm-up (a batch of 32 would cost seconds)
        embedder.forward({name: tensor[: min(batch, 8)] for name, tensor in rows.items()})
        rounds = max(1, images // batch)
        start = time.perf_counter()
        for _ in range(rounds):
            embedder.forward(rows)
        return batch * rounds / (time.perf_counter() - start)
    finally:
        embedder.forward_batch_size, embedder.pass_plan = sub_batch, plan


# --- served --------------------------------------------------------------------------------


async def _drive(
    call: Callable[[int], Awaitable[None]], total: int, concurrency: int
) -> tuple[float, list[float]]:
    """`total` calls, `concurrency` at a time, as fast as answers come."""
    latencies: list[float] = []
    next_index = iter(range(total))

    async def worker() -> None:
        for i in next_index:
            start = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


BODIES = ("json", "raw", "form")


def request_bodies(
    files: Sequence[bytes], per_request: int, kind: str = "json"
) -> list[tuple[bytes, str]]:
    """Ready /embed request bodies and their Content-Type, encoding done before the clock
    starts: base64 in JSON, the file itself (one image), or a multipart form."""
    import orjson

    ready = []
    for start in range(len(files)):
        chosen = [files[(start + k) % len(files)] for k in range(per_request)]
        if kind == "json":
            inputs = [base64.b64encode(f).decode("ascii") for f in chosen]
            ready.append((orjson.dumps({"inputs": inputs}), "application/json"))
        elif kind == "raw":
            if per_request != 1:
                raise ValueError("a raw body is one image")
            ready.append((chosen[0], "image/jpeg"))
        else:
            boundary = secrets.token_hex(16)
            parts = []
            for i, data in enumerate(chosen):
                head = (
                    f"--{boundary}\r\nContent-Disposition: form-data; name=file; "
                    f'filename="{i}.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
                )
                parts += [head.encode(), data, b"\r\n"]
            parts.append(f"--{boundary}--\r\n".encode())
            ready.append((b"".join(parts), f"multipart/form-data; boundary={boundary}"))
    return ready


async def http_load(
    url: str,
    files: Sequence[bytes],
    *,
    concurrency: int,
    requests: int,
    per_request: int = 1,
    body: str = "json",
    timeout: float = 600,
) -> Load:
    """POST /embed: `requests` requests of `per_request` images, `concurrency` at a time, the
    images in a body of kind `body` (BODIES); each request given at most `timeout` seconds."""
    import aiohttp

    bodies = request_bodies(files, per_request, body)
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:

        async def call(i: int) -> None:
            data, content_type = bodies[i % len(bodies)]
            headers = {"Content-Type": content_type}
            async with session.post(f"{url}/embed", data=data, headers=headers) as response:
                text = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"/embed answered {response.status}: {text[:300]!r}")

        await call(0)  # connection and first-request costs stay out of the clock
        seconds, latencies = await _drive(call, requests, concurrency)
    mode = "single" if per_request == 1 else "large"
    images = requests * per_request
    sent = images + per_request
    return Load("embed", mode, concurrency, per_request, images, seconds, latencies, body, sent)


async def grpc_load(
    endpoint: str,
    files: Sequence[bytes],
    *,
    concurrency: int,
    requests: int,
    per_request: int = 1,
    timeout: float | None = None,
) -> Load:
    """Triton's gRPC endpoint directly, the same images as BYTES; each call given at most
    `timeout` seconds (None: no limit)."""
    import tritonclient.grpc.aio as grpc_aio

    client = grpc_aio.InferenceServerClient(endpoint)
    tensors = []
    for start in range(len(files)):
        tensor = np.empty((per_request, 1), dtype=np.object_)
        tensor[:, 0] = [files[(start + k) % len(files)] for k in range(per_request)]
        tensors.append(tensor)
    output = [grpc_aio.InferRequestedOutput("EMBEDDING")]

    async def call(i: int) -> None:
        tensor = tensors[i % len(tensors)]
        request = grpc_aio.InferInput("IMAGE", list(tensor.shape), "BYTES")
        request.set_data_from_numpy(tensor)
        result = await client.infer("iei", [request], outputs=output, client_timeout=timeout)
        if result.as_numpy("EMBEDDING").shape[0] != per_request:
            raise RuntimeError("Triton returned the wrong number of vectors")

    try:
        await call(0)
        seconds, latencies = await _drive(call, requests, concurrency)
    finally:
        await client.close()
    mode = "single" if per_request == 1 else "large"
    images = requests * per_request
    sent = images + per_request
    return Load("grpc", mode, concurrency, per_request, images, seconds, latencies, sent=sent)


def embed_vectors(url: str, files: Sequence[bytes]) -> np.ndarray:
    """Raw vectors from /embed, to check what the stack returns."""
    import httpx

    body = {"inputs": [base64.b64encode(f).decode() for f in files], "normalize": False}
    response = httpx.post(f"{url}/embed", json=body, timeout=600)
    response.raise_for_status()
    return np.array(response.json(), dtype=np.float64)


# --- CPU time by process ----------------------------------------------------------------------

# Which part of the stack a process is, by the first marker in its own or an ancestor's command
# line (uvicorn's worker processes are `python -c from multiprocessing...` under uvicorn).
ROLES = (
    (b"triton_python_backend_stub", "model"),
    (b"tritonserver", "triton"),
    (b"uvicorn", "frontend"),
)


def _processes() -> dict[int, tuple[int, bytes, float]]:
    """pid -> (parent pid, command line, CPU seconds) of every process we can read."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        found[int(entry.name)] = (int(fields[1]), command, cpu)
    return found


def cpu_by_role(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds so far) for the processes under `root` (`iei serve`), plus this
    process (the load generator: `client`)."""
    processes = _processes()
    found = {}
    for pid, (_, _, seconds) in processes.items():
        chain, cursor = [], pid
        while cursor in processes and cursor != root and len(chain) < 64:
            chain.append(processes[cursor][1])
            cursor = processes[cursor][0]
        if cursor != root:
            continue  # not under `iei serve`
        role = next((r for marker, r in ROLES for c in chain if marker in c), "launcher")
        found[pid] = (role, seconds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    found[os.getpid()] = ("client", usage.ru_utime + usage.ru_stime)
    return found


def cpu_per_image(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], images: int
) -> dict[str, float]:
    """Microseconds of CPU per image by role between two `cpu_by_role` snapshots. Only processes
    alive at both count: one that started or ended in between (a restart) is left out."""
    totals: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        if pid in before:
            totals[role] = totals.get(role, 0.0) + (seconds - before[pid][1]) / images * 1e6
    return totals
