"""`make bench-gpu` (`python -m bench.gpu`): the GPU path in one run, within a time budget.

    .venv/bin/python -m bench.gpu                     # every layout, at most 8 minutes
    .venv/bin/python -m bench.gpu --layouts split     # one layout
    .venv/bin/python -m bench.gpu --layouts split,split/1   # two encoders per GPU against one
    .venv/bin/python -m bench.gpu --model vit-tiny --budget 60 --out /tmp/x   # the tool itself

ViT-B/16 (random weights: the real cost) in the precision `IEI_DTYPE=auto` picks (fp16 on a GPU):
the in-process limit (the forward pass alone on preprocessed batches); the cosine of vectors from
JPEGs decoded by the encoder's tensor decoder (nvImageCodec or nvJPEG on a GPU, torchvision's
libjpeg-turbo standing in on a CPU) to the PIL path's; then, per layout, for web photos
(450-640 px, several sizes mixed) and 12 MP phone photos, `/embed` with single-image and 32-image
requests at several concurrencies and Triton's gRPC endpoint directly, with the CPU's and the
GPU's utilisation over each window.

- The whole run keeps to `--budget` seconds (default 480; under `make bench-gpu` with a bundle,
  counted from the moment its runner starts, the install and checks included: `--started`): each
  window is sized from a short probe of that very load (its own rate, not the in-process one),
  and cut down to what the budget leaves for the windows still to come; a load the budget cannot
  fit is written as skipped.
- Every row is appended to `<out>/benchmarks/gpu-rows.jsonl` as soon as it is measured (a run
  cut short keeps what it measured), then the `gpu` part of results.json and benchmarks.md are
  written at the end. `<out>` is `--out`, else `$OUT/docs` where the environment sets OUT (a lent
  GPU machine hands back only that folder), else docs/.
- `VERDICT` lines on stdout: img/s through `/embed`, its ratio to the in-process limit of the
  same run, the decoded vectors' cosine to the PIL path, two encoders per GPU against one, and
  the in-process forward pass with IEI_CUDA_GRAPHS on against off (the model's own captures, at
  batch sizes it captures).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import measure, report
from .gpu_bundle import DEFAULT_BUDGET, default_out
from .workload import (
    IEI_SERVE,
    MODELS,
    PHOTOS,
    ROOT,
    ServedStack,
    build_model,
    device,
    embedder_for,
    load_model_module,
    make_jpegs,
    preprocessed,
    start_server,
    stop_server,
)

DOCS = ROOT / "docs"
# Web photos: 450-640 px on the long side, in several shapes, mixed in every load; phone photos:
# 12 MP. The report's headline is the web set.
PHOTO_SETS: dict[str, tuple[tuple[int, int], ...]] = {
    "web": ((640, 480), (450, 600), (500, 375), (600, 450), (480, 640), (560, 420)),
    "12mp": ((4000, 3000),),
}
PER_REQUEST = 32  # images per request of the batched loads
# 32 phone photos are a 64 MB body, at the default IEI_PAYLOAD_LIMIT and over what one worker
# may hold (IEI_BODY_WORKER_MAX_BYTES, 64 MiB: two such requests on one worker were a 429).
LARGE_BODIES = {"IEI_PAYLOAD_LIMIT": str(256 << 20), "IEI_BODY_WORKER_MAX_BYTES": str(1 << 30)}
# (path, images per request, concurrencies) by device: fewer on a CPU, where a window of 32-image
# requests at 4 at once already takes seconds at ViT-B/16's few images per second.
LOADS = {
    "cuda": (
        ("embed", 1, (1, 16, 64)),
        ("embed", PER_REQUEST, (4, 16)),
        ("grpc", PER_REQUEST, (16,)),
    ),
    # On a CPU an execution of 64 12 MP photos takes the encoder's one process many seconds
    # (its decode is the GPU's job): 8-image requests there.
    "cpu": (("embed", 1, (1, 8)), ("embed", 8, (2,)), ("grpc", 8, (2,))),
}
MIN_WINDOW = 0.3  # seconds: a load the budget leaves less for is skipped
# Seconds kept for stopping a stack and writing the report: 20, less in a short budget.
STOP_RESERVE = 20.0
STOP_WAIT = 60.0  # seconds a stack is given to stop, at most (ServedStack's)
TRITON_EXIT = 15.0  # and at least: the launcher's --exit-timeout-secs for Triton
COSINE_TARGET = 0.999
ENCODERS_MARGIN = 1.05  # two encoders per GPU against one: what counts as faster
# IEI_CUDA_GRAPHS off against on, in-process: batch sizes that the model captures (1, 2, 4 ... up
# to its forward batch, 64 on a GPU: cuda_graphs.capture_sizes), a single image, a partly filled
# execution and a full one; each window at most GRAPH_WINDOW seconds. Within GRAPHS_MARGIN of
# each other (their rates' geometric mean), either serves alike.
GRAPH_BATCHES = (1, 16, 64)
GRAPH_WINDOW = 2.0
GRAPHS_MARGIN = 1.05


def log(message: str) -> None:
    sys.stderr.write(f"[bench-gpu {time.strftime('%H:%M:%S')}] {message}\n")


class Budget:
    """The run's deadline, and each window's share of what is left of it."""

    def __init__(self, seconds: float, started: float | None = None) -> None:
        """`started`: the Unix time the run began, where that was before this process (the
        bundle runner's install and checks count against the same `seconds`); else now."""
        self.seconds = seconds
        before = 0.0 if started is None else max(0.0, time.time() - started)
        self.started = time.monotonic() - before
        self.deadline = self.started + seconds
        self.reserve = min(STOP_RESERVE, 0.15 * seconds)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def window(self, wanted: float, windows_left: int, reserve: float) -> float:
        """Seconds for the next window: `wanted`, or an equal share of what is left after
        `reserve`, over the `windows_left` windows still to come (this one included)."""
        share = (self.left() - reserve) / max(1, windows_left)
        return max(0.0, min(wanted, share))


class BudgetedStack(ServedStack):
    """`iei serve` that must be healthy within what the budget leaves (after its reserve), and
    is given what is left of the budget to stop."""

    def __init__(self, model_dir: Path, log_path: Path, budget: Budget, **env: str) -> None:
        super().__init__(model_dir, log_path, **env)
        self.budget = budget

    def __enter__(self) -> BudgetedStack:
        command = list(IEI_SERVE)
        timeout = max(10.0, self.budget.left() - self.budget.reserve)
        self.process = start_server(
            "iei serve", command, self.env, self.log_path, self.url, timeout
        )
        return self

    def __exit__(self, *_: object) -> None:
        # At least Triton's own --exit-timeout-secs: a SIGKILL sooner would leave Triton and
        # the frontend (in sessions of their own) running, the GPU's memory held.
        stop_server(self.process, min(STOP_WAIT, max(TRITON_EXIT, self.budget.left() - 3)))


class Rows:
    """The run's rows, each appended to a JSON-lines file as soon as it is measured."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path = path
        self.budget = budget
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        row = {**row, "t": round(self.budget.elapsed(), 2)}
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row


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


def photo_set(name: str) -> list[bytes]:
    """The sample photos at every size of the set, interleaved (a load cycles through them)."""
    per_size = [camera_jpegs(size, seed=k) for k, size in enumerate(PHOTO_SETS[name])]
    return [f for group in zip(*per_size, strict=True) for f in group]


def camera_jpegs(size: tuple[int, int], seed: int) -> list[bytes]:
    """workload.make_jpegs' photos (resized, sensor-like noise, quality 90), with the noise
    tiled from one 256x256 block: a 12 MP photo in a fraction of a second instead of seconds,
    and as hard to compress (each 8x8 block of a JPEG is coded on its own)."""
    if size[0] * size[1] <= 1_000_000:
        return make_jpegs(size, seed)
    rng = np.random.default_rng(seed)
    block = rng.normal(0, 3, (256, 256, 3)).round().astype(np.int16)
    files = []
    for path in sorted(PHOTOS.glob("*.jpg")):
        image = Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16)
        reps = (-(-size[1] // 256), -(-size[0] // 256), 1)
        pixels += np.tile(block, reps)[: size[1], : size[0]]
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def inprocess_limit(mm: Any, model_dir: Path, files: list[bytes], window: float) -> dict:
    """The forward pass alone at the execution's batch (64: config.pbtxt's max_batch_size), in
    the precision auto picks, on preprocessed images: what the served stack is measured against.
    The window is sized from a probe of one batch."""
    import torch

    embedder = embedder_for(mm, model_dir, "auto")
    try:
        pixels = preprocessed(mm, embedder, files)
        batch = 64 if device().type == "cuda" else 8
        rate = measure.forward_limit(embedder, pixels, batch, batch)  # the probe
        images = max(batch, int(rate * window) // batch * batch)
        rate = measure.forward_limit(embedder, pixels, batch, images)
        dtype = str(embedder.dtype).removeprefix("torch.")
    finally:
        embedder.close()
    if device().type == "cuda":
        torch.cuda.empty_cache()
    log(f"in-process {dtype} forward pass, batch {batch}: {rate:.1f} img/s")
    return {"dtype": dtype, "batch": batch, "img_s": rate, "images": images}


def cuda_graphs_rates(
    mm: Any, model_dir: Path, files: list[bytes], window: float, rows: Rows
) -> dict:
    """The in-process forward pass with IEI_CUDA_GRAPHS off, then on (the model's own loading:
    the encoder captured at 1, 2, 4 ... 64 and replayed), at GRAPH_BATCHES on preprocessed
    images, each window of about `window` seconds at a probe's rate; a row for each. Raises
    what fails, and when the graphs were not what ran."""
    import torch

    rates: dict[int, dict[str, float]] = {}
    pixels, dtype = None, ""
    for graphs in (False, True):
        environ = {"IMAGE_EMBEDDING_MODEL": str(model_dir), "IEI_DTYPE": "auto",
                   "IEI_ENGINE": "torch", "IEI_CUDA_GRAPHS": str(graphs).lower()}  # fmt: skip
        embedder = mm.load_embedder(mm.read_settings({}, environ), device(), os.cpu_count() or 1)
        try:
            replays = getattr(embedder.run, "replays", None)  # a GraphedRunner's count
            if graphs and replays is None:
                raise RuntimeError("IEI_CUDA_GRAPHS=true loaded an encoder without CUDA graphs")
            pixels = preprocessed(mm, embedder, files) if pixels is None else pixels
            dtype = str(embedder.dtype).removeprefix("torch.")
            for batch in [b for b in GRAPH_BATCHES if b <= embedder.forward_batch_size]:
                probe = measure.forward_limit(embedder, pixels, batch, batch)
                images = max(batch, int(probe * window) // batch * batch)
                rate = measure.forward_limit(embedder, pixels, batch, images)
                rows.write({"kind": "cuda_graphs", "graphs": graphs, "batch": batch,
                            "dtype": dtype, "img_s": rate, "images": images})  # fmt: skip
                rates.setdefault(batch, {})["on" if graphs else "off"] = rate
                log(f"in-process {dtype}, CUDA graphs {'on' if graphs else 'off'}, "
                    f"batch {batch}: {rate:.1f} img/s")  # fmt: skip
            if graphs and embedder.run.replays == replays:
                raise RuntimeError("IEI_CUDA_GRAPHS=true: no batch was replayed from a graph")
        finally:
            embedder.close()
            del embedder
            if device().type == "cuda":
                torch.cuda.empty_cache()
    return {"dtype": dtype, "rates": [{"batch": b, **r} for b, r in rates.items()]}


def decoded_cosine(model_dir: Path, sets: dict[str, list[bytes]]) -> dict:
    """Vectors of JPEGs decoded by the split layout's encoder (its tensor decoder: IEI_JPEG_DECODER
    auto on a GPU, torchvision on a CPU as the stand-in) against the PIL path's, per photo set:
    the lowest cosine."""
    load_model_module()  # iei_runtime importable
    from iei_runtime import loading
    from iei_runtime.settings import read_settings

    where = device()
    requested = "auto" if where.type == "cuda" else "torchvision"
    environ = {"IMAGE_EMBEDDING_MODEL": str(model_dir), "IEI_ENGINE": "torch"}
    threads = max(1, len(os.sched_getaffinity(0)))
    with contextlib.ExitStack() as loaded:  # what was loaded is closed, whatever fails next
        pil = loading.load_embedder(read_settings({}, environ), where, threads)
        loaded.callback(pil.close)
        split = read_settings({}, {**environ, "IEI_JPEG_DECODER": requested})
        preprocess = loading.load_preprocess_stage(split, threads)
        loaded.callback(preprocess.preprocessor.close)
        encoder = loading.load_encode_stage(split, where, threads)
        loaded.callback(encoder.embedder.close)
        lowest = {}
        for name, files in sets.items():
            chosen = files[: 2 * len(PHOTO_SETS[name])]
            expected = np.stack(pil.embed(chosen))
            pixels, jpegs, headers = preprocess.outputs(preprocess.run(chosen))  # type: ignore[arg-type]
            files_ = [bytes(j) for j in jpegs[:, 0]]
            if not all(files_):
                raise RuntimeError(f"{name}: some JPEGs were not passed to the tensor decoder")
            vectors = np.stack(encoder.embed([pixels], files_, headers))
            lowest[name] = float(measure.cosine(vectors, expected).min())
        decoder = encoder.decoder.name if encoder.decoder else "pil"
    return {"decoder": decoder, "device": where.type, "cosine_min": lowest}


def load_plan(layouts: list[str], sets: list[str]) -> list[tuple[str, str, str, int, int]]:
    """Every served load in the order measured: (layout, set, path, per request, concurrency).
    A layout with an instance count (`split/1`) is a comparison with the default's: the first
    photo set's `/embed` loads only, and only on a GPU (a CPU host runs one encoder anyway)."""
    kind = device().type
    loads = LOADS[kind]
    return [
        (layout, name, path, per_request, concurrency)
        for layout in layouts
        if kind == "cuda" or "/" not in layout
        for name in (sets[:1] if "/" in layout else sets)
        for path, per_request, concurrencies in loads
        if path == "embed" or "/" not in layout
        for concurrency in concurrencies
    ]


def layout_environ(layout: str) -> dict[str, str]:
    """The stack's settings for a `--layouts` entry: `split`, or `split/1` (IEI_TRITON_INSTANCES
    too: the split layout's encoders per GPU)."""
    name, _, instances = layout.partition("/")
    environ = {"IEI_TRITON_LAYOUT": name, "IEI_ENGINE": "torch", **LARGE_BODIES}
    if instances:
        environ["IEI_TRITON_INSTANCES"] = instances
    return environ


def start_load(
    stack: ServedStack,
    files: list[bytes],
    path: str,
    per_request: int,
    concurrency: int,
    timeout: float,
) -> Callable[[int], Awaitable[measure.Load]]:
    """The load as a function of its number of requests, each request given at most `timeout`
    seconds."""
    options: dict[str, Any] = {"concurrency": concurrency, "per_request": per_request,
                               "timeout": timeout}  # fmt: skip
    if path == "grpc":
        return lambda n: measure.grpc_load(stack.grpc, files, requests=n, **options)
    return lambda n: measure.http_load(stack.url, files, requests=n, **options)


async def measured_load(
    run: Callable[[int], Awaitable[measure.Load]], concurrency: int, window: float
) -> dict:
    """A short probe of the load (two requests per client), then a window of about `window`
    seconds at the probe's own rate; the probe's row when it already took half the window."""
    probe = await run(2 * concurrency)
    requests = int(probe.img_s * window / probe.per_request)
    if probe.seconds >= window / 2 or requests <= 2 * concurrency:
        return {**probe.row(), "cpu_percent": None, "gpu_percent": None, "probe_only": True}
    with Utilisation() as utilisation:
        result = await run(requests)
    return {**result.row(), "cpu_percent": utilisation.cpu_percent,
            "gpu_percent": utilisation.gpu_percent, "probe_only": False}  # fmt: skip


async def within(load: Awaitable[dict], seconds: float) -> dict:
    """`load`'s row, or TimeoutError after `seconds` (the load cancelled, its clients closed)."""
    return await asyncio.wait_for(load, seconds)


def serve_and_measure(
    model_dir: Path,
    work: Path,
    sets: dict[str, list[bytes]],
    plan: list[tuple[str, str, str, int, int]],
    seconds: float,
    budget: Budget,
    rows: Rows,
) -> dict[str, dict[str, list[dict]]]:
    """Each layout in `plan` served in turn, its loads measured within the budget."""
    served: dict[str, dict[str, list[dict]]] = {}
    for layout in dict.fromkeys(step[0] for step in plan):
        steps = [step for step in plan if step[0] == layout]
        if budget.left() < budget.reserve + 10:
            for step in steps:
                skip(rows, step, "the budget ran out before this layout started")
            continue
        log(f"{layout} layout: starting ({budget.left():.0f} s of the budget left)")
        environ = layout_environ(layout)
        if device().type != "cuda":
            environ["IEI_JPEG_DECODER"] = "torchvision"  # the GPU decoder's CPU stand-in
        log_path = work / f"{layout.replace('/', '-')}.log"
        stack = BudgetedStack(model_dir, log_path, budget, **environ)
        try:
            stack.__enter__()  # started once here; `with stack` below would start it again
        except (RuntimeError, OSError) as exc:  # not healthy in the budget, exited, not run
            tail = log_path.read_text(errors="replace")[-3000:]
            log(f"{layout} layout did not start: {exc}\n{tail}")
            for step in steps:
                skip(rows, step, f"the {layout} layout did not start within the budget")
            continue
        try:
            served[layout] = {}
            for k, step in enumerate(steps):
                _, name, path, per_request, concurrency = step
                windows_left = len(plan) - plan.index(step)
                window = budget.window(seconds, windows_left, budget.reserve)
                if window < MIN_WINDOW:
                    skip(rows, step, f"the budget left {window:.1f} s for this window")
                    continue
                # A load stuck past what the budget leaves (its client's timeouts included) is
                # given up, so that the rest is still skipped in time and the verdicts printed.
                bound = budget.left() - budget.reserve
                run = start_load(stack, sets[name], path, per_request, concurrency, bound)
                try:
                    row = asyncio.run(within(measured_load(run, concurrency, window), bound))
                except TimeoutError:
                    skip(rows, step, f"it did not finish in the {bound:.0f} s the budget left")
                    continue
                except Exception as exc:  # written down; the other loads still run
                    rows.write({"kind": "failed", "layout": layout, "set": name, "path": path,
                                "per_request": per_request, "concurrency": concurrency,
                                "error": str(exc)[:500]})  # fmt: skip
                    log(f"  {name} {path} {per_request} img x c={concurrency} failed: {exc}")
                    continue
                row = rows.write({"kind": "served", "layout": layout, "set": name, **row})
                served[layout].setdefault(name, []).append(row)
                log(
                    f"  {name} {path} {per_request} img x c={concurrency}: "
                    f"{row['img_s']:.1f} img/s ({row['seconds']:.1f} s, step {k + 1}/{len(steps)})"
                )
        finally:
            stack.__exit__(None, None, None)
    return served


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def skip(rows: Rows, step: tuple[str, str, str, int, int], why: str) -> None:
    layout, name, path, per_request, concurrency = step
    rows.write({"kind": "skipped", "layout": layout, "set": name, "path": path,
                "per_request": per_request, "concurrency": concurrency, "why": why})  # fmt: skip
    log(f"  skipped {layout} {name} {path} {per_request} img x c={concurrency}: {why}")


def verdicts(part: dict[str, Any]) -> list[str]:
    """The run's VERDICT lines: the served rate through /embed, its ratio to the in-process
    limit of the same run, the decoded vectors' cosine to the PIL path, encoders per GPU, and
    CUDA graphs on or off."""
    meta, limit = part["meta"], part["inprocess"]
    gpu = meta.get("gpu")
    where = (
        gpu or f"no GPU: the CPU ({meta['cores']} cores); the GPU figures are still to be measured"
    )
    embed = [
        (layout, name, x)
        for layout, by_set in part["served"].items()
        for name, loads in by_set.items()
        for x in loads
        if x["path"] == "embed"
    ]
    headline = [e for e in embed if e[0] == "split" and e[1] == "web"] or embed
    lines = []
    if headline:
        layout, name, top = max(headline, key=lambda e: e[2]["img_s"])
        load = f"{layout} layout, {name} photos, {top['per_request']} img x c={top['concurrency']}"
        target = f"target >= {report.GPU_TARGET_IMG_S} on one H100 (ViT-B/16)"
        # The target is an H100's: another card (an H200 is lent too) is reported, not judged.
        on_h100 = bool(gpu) and "H100" in str(gpu)
        met = ("yes" if top["img_s"] >= report.GPU_TARGET_IMG_S else "no") if on_h100 else "n/a"
        lines.append(f"VERDICT embed_img_s={top['img_s']:.1f} ({load}; {where}) {target}: {met}")
        share = top["img_s"] / limit["img_s"]
        met = ("yes" if share >= report.GPU_TARGET_SHARE else "no") if gpu else "n/a"
        lines.append(
            f"VERDICT embed_to_inprocess={share:.2f} (in-process {limit['dtype']} "
            f"{limit['img_s']:.1f} img/s, same run) target >= {report.GPU_TARGET_SHARE}: {met}"
        )
    else:
        lines.append(f"VERDICT embed_img_s=not measured (the budget ran out; {where})")
        lines.append("VERDICT embed_to_inprocess=not measured")
    cosine = part.get("decoded_cosine")
    if cosine:
        low = min(cosine["cosine_min"].values())
        sets = ", ".join(f"{k} {v:.5f}" for k, v in cosine["cosine_min"].items())
        lines.append(
            f"VERDICT decoded_cosine_min={low:.5f} ({cosine['decoder']} on {cosine['device']} vs "
            f"PIL: {sets}) target >= {COSINE_TARGET}: {'yes' if low >= COSINE_TARGET else 'no'}"
        )
    else:
        why = part.get("not_measured", {}).get("decoded_cosine", "the budget ran out")
        lines.append(f"VERDICT decoded_cosine_min=not measured ({why})")
    lines.append(encoders_verdict(embed))
    lines.append(graphs_verdict(part))
    return lines


def graphs_verdict(part: dict[str, Any]) -> str:
    """IEI_CUDA_GRAPHS on against off, in-process: the geometric mean of the rates' ratios over
    the batch sizes measured both ways, and each."""
    graphs = part.get("cuda_graphs") or {}
    pairs = [r for r in graphs.get("rates", []) if "on" in r and "off" in r]
    if not pairs:
        why = part.get("not_measured", {}).get("cuda_graphs", "the budget ran out")
        return f"VERDICT cuda_graphs=not measured ({why})"
    ratio = float(np.exp(np.mean([np.log(r["on"] / r["off"]) for r in pairs])))
    faster = "on" if ratio >= GRAPHS_MARGIN else "off" if ratio <= 1 / GRAPHS_MARGIN else "either"
    each = ", ".join(
        f"batch {r['batch']} {r['off']:.1f} -> {r['on']:.1f} img/s ({r['on'] / r['off']:.2f}x)"
        for r in pairs
    )
    return (
        f"VERDICT cuda_graphs={faster} (in-process {graphs['dtype']} forward pass, "
        f"IEI_CUDA_GRAPHS off -> on: {each}; {ratio:.2f}x overall): the default is off"
    )


def encoders_verdict(embed: list[tuple[str, str, dict]]) -> str:
    """Two encoders per GPU (the split layout's default) against one (`split/1`): the best
    `/embed` rate of each on the photo set both measured."""
    best: dict[tuple[str, str], float] = {}
    for layout, name, x in embed:
        best[layout, name] = max(best.get((layout, name), 0.0), x["img_s"])
    shared = [name for (layout, name) in best if layout == "split/1" and ("split", name) in best]
    if not shared:
        return "VERDICT encoders_per_gpu=not measured (on a GPU only, with --layouts split,split/1)"
    name = shared[0]
    two, one = best["split", name], best["split/1", name]
    # Within the margin, one window's noise would pick the winner: either count serves alike.
    faster = (
        "2" if two >= one * ENCODERS_MARGIN else "1" if one >= two * ENCODERS_MARGIN else "either"
    )
    return (
        f"VERDICT encoders_per_gpu={faster} (split layout, {name} photos, best /embed: 2 per GPU "
        f"{two:.1f} img/s, 1 per GPU {one:.1f} img/s, {two / one:.2f}x): the default is 2"
    )


def run(args: argparse.Namespace, work: Path, budget: Budget, rows: Rows) -> dict:
    mm = load_model_module()
    model_dir = build_model(args.model, work / args.model)
    sets = {name: photo_set(name) for name in args.sets}
    log(
        f"photos made ({budget.elapsed():.0f} s): "
        + ", ".join(f"{k} {len(v)}" for k, v in sets.items())
    )
    plan = load_plan(args.layouts, args.sets)
    on_gpu = device().type == "cuda"
    graph_windows = 2 * len(GRAPH_BATCHES) if on_gpu else 0
    windows = len(plan) + 1 + graph_windows  # the served loads, the in-process limit, graphs
    window = budget.window(args.seconds, windows, budget.reserve + 30)
    limit = inprocess_limit(mm, model_dir, sets[args.sets[0]], max(MIN_WINDOW, window))
    rows.write({"kind": "inprocess", **limit})
    cosine, not_measured = None, {"decoded_cosine": "the budget ran out"}
    if budget.left() > budget.reserve + 20:
        try:
            cosine = decoded_cosine(model_dir, sets)
        except Exception as exc:  # written down; the served loads and the verdicts still come
            not_measured["decoded_cosine"] = first_line(exc)
            rows.write({"kind": "decoded_cosine", "error": not_measured["decoded_cosine"]})
            log(f"decoded cosine not measured: {not_measured['decoded_cosine']}")
        else:
            del not_measured["decoded_cosine"]
            rows.write({"kind": "decoded_cosine", **cosine})
    graphs = None
    window = budget.window(min(args.seconds, GRAPH_WINDOW), len(plan) + graph_windows,
                           budget.reserve + 30)  # fmt: skip
    if not on_gpu:
        not_measured["cuda_graphs"] = "CUDA graphs need a GPU; this run is on the CPU"
    elif window < MIN_WINDOW:
        not_measured["cuda_graphs"] = f"the budget left {window:.1f} s per window"
    else:
        try:
            graphs = cuda_graphs_rates(mm, model_dir, sets[args.sets[0]], window, rows)
        except Exception as exc:  # written down; the served loads and the verdicts still come
            not_measured["cuda_graphs"] = first_line(exc)
    if graphs is None:
        rows.write({"kind": "cuda_graphs", "why": not_measured["cuda_graphs"]})
        log(f"CUDA graphs off/on not measured: {not_measured['cuda_graphs']}")
    served = serve_and_measure(model_dir, work, sets, plan, args.seconds, budget, rows)
    return {"inprocess": limit, "decoded_cosine": cosine, "cuda_graphs": graphs,
            "served": served, "not_measured": not_measured}  # fmt: skip


def meta(argv: list[str], budget: Budget) -> dict:
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
        "budget": budget.seconds,
        "seconds": round(budget.elapsed()),
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
        "--layouts",
        default="split,single,split/1",
        help="IEI_TRITON_LAYOUT values to serve, in turn (split/1: with IEI_TRITON_INSTANCES=1)",
    )
    parser.add_argument("--sets", default="web,12mp", help=f"photo sets: {', '.join(PHOTO_SETS)}")
    parser.add_argument("--model", default="vit-base", choices=sorted(MODELS))
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="seconds for the whole run (under `make bench-gpu` with a bundle: from the moment "
        "its runner starts, the install and checks included)",
    )
    parser.add_argument(
        "--started",
        type=float,
        default=None,
        help="Unix time the run began (the bundle runner passes its own start); default: now",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="longest measurement window")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for benchmarks.md, benchmarks/results.json and benchmarks/gpu-rows.jsonl "
        "(each row appended as it is measured); default: $OUT/docs where the environment sets OUT "
        "(the only folder a lent GPU machine returns), else docs/",
    )
    args = parser.parse_args(argv)
    args.out = args.out or default_out()
    args.layouts, args.sets = args.layouts.split(","), args.sets.split(",")
    unknown = set(args.sets) - set(PHOTO_SETS)
    if unknown:
        parser.error(f"--sets: unknown {', '.join(sorted(unknown))}")
    budget = Budget(args.budget, args.started)
    rows = Rows(args.out / "benchmarks" / "gpu-rows.jsonl", budget)
    with tempfile.TemporaryDirectory(prefix="iei-bench-gpu-") as tmp:
        part = run(args, Path(tmp), budget, rows)
    part["meta"] = meta(argv, budget)
    for line in verdicts(part):
        print(line, flush=True)  # noqa: T201 (the run's verdict, for whoever reads stdout)
    # Elsewhere than docs/ (under $OUT), the report starts from the repository's results: the
    # folder then mirrors docs/, its files ready to copy over the checkout's.
    results_path = args.out / "benchmarks" / "results.json"
    known = results_path if results_path.exists() else DOCS / "benchmarks" / "results.json"
    results = json.loads(known.read_text()) if known.exists() else {}
    results["gpu"] = part
    results_path.write_text(json.dumps(results, indent=1))
    report.write(results, args.out, plots=False)  # its part is not plotted
    log(f"wrote {args.out / 'benchmarks.md'} in {part['meta']['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
