"""`make bench-gpu` (`python -m bench.gpu`): the GPU path in one run of a few minutes.

    .venv/bin/python -m bench.gpu                     # every layout this host serves
    .venv/bin/python -m bench.gpu --layouts split     # one layout

ViT-B/16 (random weights: the real cost) in the precision `IEI_DTYPE=auto` picks (fp16 on a GPU):
the in-process limit (the forward pass alone on preprocessed batches), then for 500x375 and
4000x3000 JPEGs `/embed` with single-image and 32-image requests at several concurrencies and
Triton's gRPC endpoint directly, each with the CPU's and the GPU's utilisation over its window.
On a GPU host the split layout is measured (what `auto` serves there) and the single one beside
it; on a CPU host both, the same way. Writes the `gpu` part of docs/benchmarks/results.json and
re-renders docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from . import measure, report
from .workload import (
    ROOT,
    ServedStack,
    build_model,
    device,
    embedder_for,
    load_model_module,
    make_jpegs,
    preprocessed,
)

DOCS = ROOT / "docs"
SIZES = ((500, 375), (4000, 3000))
PER_REQUEST = 32  # images per request of the batched loads
# Concurrencies: (single-image requests, 32-image requests). Fewer on a CPU, where a window of
# 32-image requests at 4 at once already takes seconds at ViT-B/16's few images per second.
LEVELS = {"cuda": ((1, 16, 64), (1, 4, 16)), "cpu": ((1, 16), (1, 2))}


def log(message: str) -> None:
    sys.stderr.write(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}\n")


class Utilisation:
    """The machine's CPU busy share (all cores, from /proc/stat) and the first GPU's (NVML, the
    share of time a kernel ran, sampled every 100 ms) over a `with` block; None where there is no
    GPU or no nvidia-ml-py."""

    def __init__(self) -> None:
        self.cpu_percent: float | None = None
        self.gpu_percent: float | None = None
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception:  # no nvidia-ml-py, no driver, no GPU: no GPU figure
            self._nvml = None

    @staticmethod
    def _cpu_times() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    def _sample_gpu(self) -> None:
        pynvml, handle = self._nvml
        while not self._stop.wait(0.1):
            self._samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def __enter__(self) -> Utilisation:
        self._cpu = self._cpu_times()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample_gpu, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        busy, total = self._cpu_times()
        self.cpu_percent = 100 * (busy - self._cpu[0]) / max(1, total - self._cpu[1])
        if self._nvml is not None:
            self._stop.set()
            self._thread.join()
            self.gpu_percent = sum(self._samples) / len(self._samples) if self._samples else None


def inprocess_limit(mm: Any, model_dir: Path, files: list[bytes], seconds: float) -> dict:
    """The forward pass alone at the execution's batch (64: config.pbtxt's max_batch_size), in
    the precision auto picks, on preprocessed images: what the served stack is measured against."""
    import torch

    embedder = embedder_for(mm, model_dir, "auto")
    pixels = preprocessed(mm, embedder, files)
    batch = 64 if device().type == "cuda" else 8
    rate = measure.forward_limit(embedder, pixels, batch, batch)  # a first guess: sizes the run
    images = max(batch, int(rate * seconds) // batch * batch)
    rate = measure.forward_limit(embedder, pixels, batch, images)
    dtype = str(embedder.dtype).removeprefix("torch.")
    log(f"in-process {dtype} forward pass, batch {batch}: {rate:.1f} img/s")
    embedder.close()
    if device().type == "cuda":
        torch.cuda.empty_cache()
    return {"dtype": dtype, "batch": batch, "img_s": rate}


async def measured(load: Any, utilisation: Utilisation) -> dict:
    with utilisation:
        result = await load
    return {**result.row(), "cpu_percent": utilisation.cpu_percent,
            "gpu_percent": utilisation.gpu_percent}  # fmt: skip


async def served(stack: ServedStack, files: list[bytes], rate: float, seconds: float) -> list[dict]:
    """Every load of one layout and one image size; each window sized to about `seconds`."""
    single, batched = LEVELS[device().type]
    rows = []
    for concurrency in single:
        requests = max(2 * concurrency, int(rate * seconds))
        load = measure.http_load(stack.url, files, concurrency=concurrency, requests=requests)
        rows.append(await measured(load, Utilisation()))
    for concurrency in batched:
        requests = max(concurrency, int(rate * seconds / PER_REQUEST))
        load = measure.http_load(
            stack.url, files, concurrency=concurrency, requests=requests, per_request=PER_REQUEST
        )
        rows.append(await measured(load, Utilisation()))
    concurrency = batched[-1]
    requests = max(concurrency, int(rate * seconds / PER_REQUEST))
    load = measure.grpc_load(
        stack.grpc, files, concurrency=concurrency, requests=requests, per_request=PER_REQUEST
    )
    rows.append(await measured(load, Utilisation()))
    for row in rows:
        log(
            f"  {row['path']} {row['per_request']} img x c={row['concurrency']}: "
            f"{row['img_s']:.1f} img/s, CPU {row['cpu_percent']:.0f} %"
            + (f", GPU {row['gpu_percent']:.0f} %" if row["gpu_percent"] is not None else "")
        )
    return rows


def run(work: Path, layouts: list[str], seconds: float) -> dict:
    mm = load_model_module()
    model_dir = build_model("vit-base", work / "vit-base")
    files = {size: make_jpegs(size) for size in SIZES}
    limit = inprocess_limit(mm, model_dir, files[SIZES[0]], seconds)
    served_rows: dict[str, dict[str, list[dict]]] = {}
    for layout in layouts:
        with ServedStack(model_dir, work / f"{layout}.log", IEI_TRITON_LAYOUT=layout) as stack:
            log(f"{layout} layout served")
            served_rows[layout] = {}
            for size, blobs in files.items():
                log(f" {size[0]}x{size[1]} JPEGs")
                rows = asyncio.run(served(stack, blobs, limit["img_s"], seconds))
                served_rows[layout][f"{size[0]}x{size[1]}"] = rows
    return {"inprocess": limit, "served": served_rows}


def meta(argv: list[str], started: float) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "command": " ".join([".venv/bin/python -m bench.gpu", *argv]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "driver": nvidia_driver() if gpu else None,
        "cores": len(os.sched_getaffinity(0)),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds": round(time.monotonic() - started),
    }


def nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layouts", default="split,single", help="IEI_TRITON_LAYOUT values to serve, in turn"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each window")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for benchmarks.md")
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iei-bench-gpu-") as tmp:
        part = run(Path(tmp), args.layouts.split(","), args.seconds)
    part["meta"] = meta(argv, started)
    results_path = args.out / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["gpu"] = part
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    report.write(results, args.out)
    log(f"wrote {args.out / 'benchmarks.md'} in {part['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
