"""The engines side by side: ViT-B/16 in-process on each engine and precision this machine runs
(`IEI_ENGINE`, `IEI_DTYPE`), and served through the real stack, in one run.

In-process is the service's own loading (`iei_runtime.loading.load_embedder`: export, cache,
runner) and forward pass; served is `iei serve` with the settings a user would give.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from . import measure
from .workload import ServedStack

# (engine, precision): what a user can ask for on a CPU. bfloat16 only where the CPU computes it.
EXACT = [("torch", "float32"), ("onnxruntime", "float32"), ("openvino", "float32")]
NATIVE_BF16 = [("torch", "bfloat16"), ("openvino", "bfloat16")]
INT8 = [("onnxruntime", "int8")]
BATCH = 8  # the CPU's forward pass (IEI_FORWARD_BATCH_SIZE=auto)
SERVED_CONCURRENCY = 16


def variants(native_bf16: bool) -> list[tuple[str, str]]:
    return [*EXACT, *(NATIVE_BF16 if native_bf16 else []), *INT8]


def run_engines(
    mm: Any,
    model_dir: Path,
    files: list[bytes],
    n: int,
    work: Path,
    log: Callable[[str], None],
    *,
    served: bool = True,
) -> dict[str, Any]:
    import torch

    # The threads an instance of the served model gets (the process's cores, not the host's).
    threads = mm.available_cores()
    torch.set_num_threads(threads)
    native = bool(mm.cpu_has_native_bf16())
    cache = work / "engine-cache"
    rows, reference = [], None
    for engine, precision in variants(native):
        environ = {"IMAGE_EMBEDDING_MODEL": str(model_dir), "IEI_ENGINE": engine,
                   "IEI_DTYPE": precision, "IEI_ENGINE_CACHE": str(cache)}  # fmt: skip
        started = time.perf_counter()
        embedder = mm.load_embedder(mm.read_settings({}, environ), torch.device("cpu"), threads)
        load_s = time.perf_counter() - started
        try:
            pixels = mm.stack(embedder.prepare(files))
            vectors = embedder.forward(pixels)
            reference = vectors if reference is None else reference
            rate = measure.forward_limit(embedder, pixels, BATCH, n)
        finally:
            embedder.close()
        row = {
            "engine": engine,
            "precision": precision,
            "img_s": rate,
            "cosine_min": float(measure.cosine(vectors, reference).min()),
            "load_s": load_s,
        }
        rows.append(row)
        log(f"in-process {engine} {precision}: {rate:.2f} img/s, cosine {row['cosine_min']:.5f}")
    loads = []
    for engine, precision in [("torch", "float32"), ("auto", "float32"), ("onnxruntime", "int8"),
                              ("auto", "auto")] if served else []:  # fmt: skip
        env = {"IEI_ENGINE": engine, "IEI_DTYPE": precision, "IEI_ENGINE_CACHE": str(cache)}
        with ServedStack(model_dir, work / f"engine-{engine}-{precision}.log", **env) as stack:
            info = httpx.get(f"{stack.url}/info", timeout=30).json()

            async def load(url: str = stack.url) -> measure.Load:
                await measure.http_load(url, files, concurrency=8, requests=16)  # warm-up
                return await measure.http_load(
                    url, files, concurrency=SERVED_CONCURRENCY, requests=max(n, 32)
                )

            done = asyncio.run(load())
        loads.append({"asked": f"{engine} {precision}", "engine": info.get("engine"),
                       "precision": info.get("dtype"), **done.row()})  # fmt: skip
        log(f"served {engine} {precision} -> {info.get('engine')} {info.get('dtype')}: "
            f"{done.img_s:.2f} img/s")  # fmt: skip
    return {"native_bf16": native, "batch": BATCH, "inprocess": rows, "served": loads}


def best_exact(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return max((r for r in rows if r["precision"] == "float32"), key=lambda r: r["img_s"])


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def fastest_int8(served: list[dict[str, Any]]) -> float:
    return max((r["img_s"] for r in served if r.get("precision") == "int8"), default=0.0)


def torch_float32(rows: list[dict[str, Any]]) -> float:
    return next(r["img_s"] for r in rows if (r["engine"], r["precision"]) == ("torch", "float32"))


def summary_lines(engines: dict[str, Any], original_img_s: float | None) -> list[str]:
    rows, served = engines["inprocess"], engines["served"]
    best = best_exact(rows)
    lines = [
        f"best exact float32 engine in-process: {best['engine']} at "
        f"{ratio(best['img_s'], torch_float32(rows)):.2f}x torch float32",
    ]
    if original_img_s:
        lines.append(
            f"/embed with IEI_DTYPE=int8: {ratio(fastest_int8(served), original_img_s):.2f}x the "
            "original service (target >= 2 on a CPU without native bf16)"
        )
    return lines
