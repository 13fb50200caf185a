"""`python -m bench`: the model's in-process limit and the served stack, side by side, in one run.

    .venv/bin/python -m bench                          # the full run (a few minutes on 2 cores)
    .venv/bin/python -m bench --queue-delays 0,2000,10000   # the dynamic batcher's delay sweep
    .venv/bin/python -m bench --render-only            # rewrite the docs from results.json
    .venv/bin/python -m bench --original DIR           # also the original IEI service (a checkout)
    .venv/bin/python -m bench --only families          # each model family's base-size throughput
    .venv/bin/python -m bench --only engines           # torch, ONNX Runtime, OpenVINO, int8

Writes docs/benchmarks.md, its plots and docs/benchmarks/results.json (each part of a run
replaces only its own results there), and the README's model guide from the families' part.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import measure, report
from .engines import run_engines
from .families import run_families
from .workload import (
    ROOT,
    SIZES,
    ServedStack,
    build_model,
    device,
    embedder_for,
    load_model_module,
    make_jpegs,
    preprocessed,
)

DOCS = ROOT / "docs"
SMALL = SIZES[0]
SIZE_LOAD = 16  # concurrent single-image requests in the image-size sweep
SIZE_ROUNDS = 3  # the image-size sweep, repeated; the median round per size counts
# Paired rounds of the headline ratio. On 2 shared cores one round's ratio ranged from 0.90 to
# 1.37 within minutes for the same stack (the forward pass alone from 6.1 to 8.4 img/s): the
# median of 5 is what a run can say.
PAIRED_ROUNDS = 5


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")


def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        lscpu = ""
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
        platform.processor() or "unknown",
    )
    import torch

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "command": " ".join([".venv/bin/python -m bench", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": os.getloadavg()[0],
        **machine(),
    }


# --- ViT-B/16: in-process limit, decode costs, served --------------------------------------


def inprocess(mm: Any, model_dir: Path, files: dict[tuple[int, int], list[bytes]], n: int) -> dict:
    """The forward pass alone in float32 and in the precision `IEI_DTYPE=auto` picks on this
    machine (bf16 on a CPU with AMX, fp16 on a GPU), cosines, and decoding costs per size."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    auto = mm.resolve_dtype("auto", device(), mm.cpu_has_native_bf16())
    reduced = str(auto).removeprefix("torch.")
    rows, vectors, embedders = [], {}, {}
    for dtype in dict.fromkeys(("float32", reduced)):
        embedder = embedders[dtype] = embedder_for(mm, model_dir, dtype)
        pixels = preprocessed(mm, embedder, files[SMALL])
        vectors[dtype] = embedder.forward(pixels)
        for batch in (1, 8, 32, 64) if device().type == "cuda" else (1, 4, 8, 32):
            images = {1: n // 4, 8: n // 2}.get(batch, n)
            rate = measure.forward_limit(embedder, pixels, batch, images)
            rows.append({"dtype": dtype, "batch": batch, "img_s": rate})
            log(f"in-process {dtype} batch {batch}: {rate:.2f} img/s")
    reduced_cosine = measure.cosine(vectors[reduced], vectors["float32"])

    # Decoding: full vs draft per source size, and the draft's cost to the embedding (fp32, so
    # that only the decoding differs).
    fp32 = embedders["float32"]
    side = mm.draft_side(fp32.processor)
    decode = []
    for size, blobs in files.items():
        full = measure.per_call(lambda b=blobs: [mm.decode_image(x, 10**9) for x in b], 2)
        draft = measure.per_call(lambda b=blobs: [mm.decode_image(x, 10**9, side) for x in b], 2)
        decoded = mm.decode_image(blobs[0], 10**9, side).size
        similarity = 1.0  # not drafted: the same pixels
        if decoded != size:
            fp32.draft_side = 0
            exact = np.stack(fp32.embed(blobs))
            fp32.draft_side = side
            drafted = np.stack(fp32.embed(blobs))
            similarity = float(measure.cosine(drafted, exact).min())
        decode.append(
            {
                "size": f"{size[0]}x{size[1]}",
                "kb": sum(map(len, blobs)) / len(blobs) / 1024,
                "full_ms": full / len(blobs) * 1000,
                "draft_ms": draft / len(blobs) * 1000,
                "decoded": f"{decoded[0]}x{decoded[1]}",
                "draft_cosine_min": similarity,
            }
        )
        log(f"decode {decode[-1]}")
    return {
        "forward": rows,
        "auto_dtype": reduced,
        "reduced_cosine_min": float(reduced_cosine.min()),
        "draft_side": side,
        "decode": decode,
        "fp32_vectors": vectors["float32"].tolist(),
        "reduced_embedder": embedders[reduced],
    }


async def served_vit(
    stack: ServedStack, files: dict[tuple[int, int], list[bytes]], n: int, levels: list[int]
) -> dict:
    small = files[SMALL]
    await measure.http_load(stack.url, small, concurrency=8, requests=16)  # warm the batch sizes
    loads = []
    for c in levels:
        loads.append(
            await measure.http_load(stack.url, small, concurrency=c, requests=max(n // 2, 2 * c))
        )
        log(f"/embed c={c}: {loads[-1].img_s:.2f} img/s")
    large = {"concurrency": 1, "requests": 2, "per_request": n}
    loads.append(await measure.http_load(stack.url, small, **large))
    log(f"/embed one request of {n}: {loads[-1].img_s:.2f} img/s")
    for c in levels:
        loads.append(
            await measure.grpc_load(stack.grpc, small, concurrency=c, requests=max(n // 2, 2 * c))
        )
        log(f"gRPC c={c}: {loads[-1].img_s:.2f} img/s")
    loads.append(await measure.grpc_load(stack.grpc, small, **large))
    # Sizes in rounds, smallest to largest each time; per size the round with the median rate
    # (one pass of a few seconds per size was at the mercy of whatever else ran then).
    rounds: dict[tuple[int, int], list[measure.Load]] = {size: [] for size in files}
    for _ in range(SIZE_ROUNDS):
        for size, blobs in files.items():
            load = await measure.http_load(stack.url, blobs, concurrency=SIZE_LOAD, requests=n)
            rounds[size].append(load)
            log(f"/embed {size} c={SIZE_LOAD}: {load.img_s:.2f} img/s")
    sizes = []
    for size, done in rounds.items():
        middle = sorted(done, key=lambda x: x.img_s)[len(done) // 2]
        sizes.append({"size": f"{size[0]}x{size[1]}", "rounds": len(done), **middle.row()})
    return {"loads": [x.row() for x in loads], "sizes": sizes}


async def paired(
    stack: ServedStack, mm: Any, embedder: Any, files: list[bytes], n: int, size: int
) -> dict:
    """One round of the headline ratio, measured back to back so that the machine's load is
    nearly the same for all of them: the forward pass alone at its best batch `size`, the
    model's whole work in-process on that many files (decode, processor, forward: what one
    Triton execution does), and the served stack."""
    pixels = preprocessed(mm, embedder, files)
    batch = (files * size)[:size]
    rounds = max(1, n // size)
    execute = measure.per_call(lambda: embedder.embed(batch), rounds) / len(batch)
    row = {
        "batch": size,
        "forward": measure.forward_limit(embedder, pixels, size, max(n, size)),
        "execute": 1 / execute,
        "embed_c16": (await measure.http_load(stack.url, files, concurrency=16, requests=n)).img_s,
        "embed_large": (
            await measure.http_load(stack.url, files, concurrency=1, requests=1, per_request=n)
        ).img_s,
        "grpc_c16": (await measure.grpc_load(stack.grpc, files, concurrency=16, requests=n)).img_s,
        # Issue 19's loads on fast CPUs: 8 single-image requests at once, 3 of 32 images.
        "embed_c8": (await measure.http_load(stack.url, files, concurrency=8, requests=n)).img_s,
        "embed_3x32": (
            await measure.http_load(stack.url, files, concurrency=3, requests=3, per_request=32)
        ).img_s,
    }
    log(f"paired round: { {k: round(v, 2) for k, v in row.items()} }")
    return row


def run_vit(
    work: Path, n: int, levels: list[int], rounds: int = PAIRED_ROUNDS, original: Path | None = None
) -> dict:
    mm = load_model_module()
    model_dir = build_model("vit-base", work / "vit-base")
    files = {size: make_jpegs(size) for size in SIZES}
    limits = inprocess(mm, model_dir, files, n)
    reduced = limits.pop("reduced_embedder")
    # The headline compares with the forward pass at its fastest batch size measured above.
    auto_rows = [r for r in limits["forward"] if r["dtype"] == limits["auto_dtype"]]
    best = max(auto_rows, key=lambda r: r["img_s"])["batch"]
    with ServedStack(model_dir, work / "vit-base.log") as stack:
        log("ViT-B/16 served")
        served = asyncio.run(served_vit(stack, files, n, levels))
        vectors = measure.embed_vectors(stack.url, files[SMALL])

        async def pairs() -> list[dict]:
            return [await paired(stack, mm, reduced, files[SMALL], n, best) for _ in range(rounds)]

        served["paired"] = asyncio.run(pairs())
    fp32 = np.array(limits.pop("fp32_vectors"))
    served["cosine_to_fp32_min"] = float(measure.cosine(vectors, fp32).min())
    # Different photos, same model: what a cosine means for random weights.
    between = [
        measure.cosine(fp32[i : i + 1], fp32[j : j + 1])[0]
        for i in range(len(fp32))
        for j in range(i + 1, len(fp32))
    ]
    limits["cosine_between_photos_max"] = float(max(between))
    results = {"inprocess": limits, "served": served}
    if original is not None:
        from .original import run_original

        log("the original IEI service")
        results["original"] = run_original(original, model_dir, work, files[SMALL], n)
    return results


# --- tiny model: the stack's own cost --------------------------------------------------------

# The photos of issue 19's goal: web JPEGs and 12 MP phone photos.
PHOTO_SETS = {"web": SMALL, "phone": SIZES[-1]}
# Its loads (each in the bodies a client may send) and the stack's cost it allows, as a multiple
# of the floor: 16 concurrent single-image requests, and requests of 64 images one at a time.
GOAL_LOADS = (
    ("single", 16, 1, ("json", "raw"), 1.6),
    ("large", 1, 64, ("json", "form"), 1.25),
)
FLOOR_ROUNDS = 3
GOAL_ROUNDS = 3
# Room for 64 phone photos in one request (base64 JSON: about 140 MB); nothing else changes.
LARGE_BODIES = {"IEI_PAYLOAD_LIMIT": str(256 << 20), "IEI_BODY_WORKER_MAX_BYTES": str(512 << 20)}


def floor_us(mm: Any, embedder: Any, files: list[bytes], reps: int) -> dict[str, float]:
    """The work a server cannot avoid per image, as CPU time of one thread: PIL decoding with
    the server's draft, the model's own processor on batches of 32 (and the fused path that
    stands in for it, fused.py), and the tiny model's forward pass."""
    import torch

    batch = (files * 32)[:32]
    side = embedder.draft_side
    decoded = [mm.decode_image(f, 10**9, side) for f in batch]
    pixels = mm.stack(embedder.preprocess(decoded))
    steps = {
        "decode_us": lambda: [mm.decode_image(f, 10**9, side) for f in batch],
        "processor_us": lambda: embedder.processor(images=decoded, return_tensors="pt"),
        "forward_us": lambda: embedder.forward(pixels),
    }
    if embedder.fused is not None:
        steps["fused_us"] = lambda: embedder.fused(decoded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # the least of FLOOR_ROUNDS: the work itself, not what else ran meanwhile
        per = {
            name: min(measure.thread_cpu_per_call(step, reps) for _ in range(FLOOR_ROUNDS))
            for name, step in steps.items()
        }
    finally:
        torch.set_num_threads(threads)
    floor = {k: v / len(batch) * 1e6 for k, v in per.items()}
    floor["decoded"] = "x".join(map(str, decoded[0].size))
    return floor


def run_tiny(work: Path, n: int, levels: list[int]) -> dict:
    import torch

    mm = load_model_module()
    model_dir = build_model("vit-tiny", work / "vit-tiny")
    photos = {name: make_jpegs(size) for name, size in PHOTO_SETS.items()}
    files = photos["web"]
    torch.set_num_threads(os.cpu_count() or 1)
    embedder = embedder_for(mm, model_dir, "auto")
    batch = (files * 32)[:32]
    decoded = [embedder.decode(f) for f in batch]
    pixels = mm.stack(embedder.preprocess(decoded))
    reps = max(2, n // 32)
    steps = {
        "decode_us": lambda: [embedder.decode(f) for f in batch],
        "preprocess_us": lambda: embedder.preprocess(decoded),
        "forward_us": lambda: embedder.forward(pixels),
        # What one Triton execution of the model does, decode threads included.
        "execute_us": lambda: embedder.embed(batch),
    }
    # The least of FLOOR_ROUNDS, as the floor's: the work, not what else ran on the 2 cores.
    inproc = {
        name: min(measure.per_call(step, reps) for _ in range(FLOOR_ROUNDS)) / len(batch) * 1e6
        for name, step in steps.items()
    }
    log(f"tiny in-process (us/image): {inproc}")
    floors = {name: floor_us(mm, embedder, blobs, reps) for name, blobs in photos.items()}
    log(f"tiny floors (CPU us/image, one thread): {floors}")

    async def measured(stack: ServedStack, load: Any, url: str, blobs: list[bytes], **shape: Any):
        assert stack.process is not None
        before = measure.cpu_by_role(stack.process.pid)
        done = await load(url, blobs, **shape)
        after = measure.cpu_by_role(stack.process.pid)
        return {**done.row(), "cpu_us": measure.cpu_per_image(before, after, done.sent)}

    async def served(stack: ServedStack) -> list[dict]:
        """Each load with the CPU time that every part of the stack spent on it per image."""
        rows = []
        # Enough images per load that /proc's 10 ms CPU ticks resolve well under 1 ms per image.
        shapes = [(c, max(16 * n, 4 * c), 1) for c in levels] + [(1, 8, 64)]
        for concurrency, requests, per_request in shapes:
            for load in (measure.http_load, measure.grpc_load):
                url = stack.url if load is measure.http_load else stack.grpc
                shape = dict(concurrency=concurrency, requests=requests, per_request=per_request)
                rows.append(await measured(stack, load, url, files, **shape))
                cpu = rows[-1]["cpu_us"]
                log(f"tiny {rows[-1]['path']} c={concurrency} x{per_request}: "
                    f"{rows[-1]['img_s']:.0f} img/s, CPU us/image "
                    f"{ {k: round(v) for k, v in cpu.items()} }")  # fmt: skip
        return rows

    async def goal(stack: ServedStack, over_http: ServedStack) -> tuple[list[dict], list[dict]]:
        """Issue 19's loads on both photo sets, in every body a client may send, in GOAL_ROUNDS
        alternating rounds (the first warms each shape up), each photo set's floor measured
        again before its loads; per load the round whose ratio to its floor is the median
        counts, and every round's figures are kept. The client's bodies also go to `over_http`
        (IEI_TRITON_SHM_MB=0: files to Triton in the HTTP body), right after the same load on
        `stack`: the shared memory transport against none, in one run."""
        rounds: dict[tuple[str, str, str, str], list[dict]] = {}
        for _ in range(GOAL_ROUNDS):
            # The floor again in every round, just before its loads: this machine's speed
            # drifts by a fifth within minutes, and a ratio's two sides must share a moment.
            for photo_set, blobs in photos.items():
                floor = floor_us(mm, embedder, blobs, reps)
                for mode, concurrency, per_request, bodies, target in GOAL_LOADS:
                    # Windows of seconds: a load's fixed costs (its connection, its first
                    # request's cold paths) are then a few per cent of its CPU, not a quarter.
                    requests = 16 * n if per_request == 1 else max(2, n // 2)
                    for body in bodies:
                        served = [("shared memory", stack)]
                        if body == report.CLIENT_BODY[mode]:
                            served.append(("HTTP body", over_http))
                        for transport, where in served:
                            row = await measured(
                                where, measure.http_load, where.url, blobs,
                                concurrency=concurrency, requests=requests,
                                per_request=per_request, body=body,
                            )  # fmt: skip
                            row.update(
                                photos=photo_set, target=target, transport=transport, floor=floor
                            )  # fmt: skip
                            rounds.setdefault((photo_set, mode, body, transport), []).append(row)
                            log(f"goal {photo_set} {mode} {body} ({transport}): "
                                f"{report.stack_us(row):.0f} us/image "
                                f"(its round's floor {report.floor_total(floor):.0f})")  # fmt: skip
        rows = []
        for done in rounds.values():
            middle = sorted(done, key=report.over_floor)[len(done) // 2]
            rows.append({
                **middle, "rounds_us": [round(report.stack_us(r)) for r in done],
                "rounds_ratio": [round(report.over_floor(r), 2) for r in done],
            })  # fmt: skip
        by_transport = [r for r in rows if r["transport"] == "HTTP body"]
        return [r for r in rows if r["transport"] != "HTTP body"], by_transport

    with (
        ServedStack(model_dir, work / "vit-tiny.log", **LARGE_BODIES) as stack,
        ServedStack(
            model_dir, work / "vit-tiny-http.log", IEI_TRITON_SHM_MB="0", **LARGE_BODIES
        ) as over_http,
    ):
        loads = asyncio.run(served(stack))
        goal_loads, over_http_loads = asyncio.run(goal(stack, over_http))
    embedder.close()
    return {
        "inprocess_us": inproc, "loads": loads, "floors": floors, "goal": goal_loads,
        "over_http": over_http_loads,
    }  # fmt: skip


# --- dynamic batcher: queue delay -----------------------------------------------------------


def run_queue_delays(work: Path, delays: list[int], n: int) -> dict:
    from .workload import with_queue_delay

    model_dir = build_model("vit-base", work / "vit-base")
    files = make_jpegs(SMALL)
    rows = []
    for delay in delays:
        repository = with_queue_delay(ROOT / "model_repository", work / f"repo-{delay}", delay)
        env = {"IEI_MODEL_REPOSITORY": str(repository)}
        with ServedStack(model_dir, work / f"delay-{delay}.log", **env) as stack:

            async def sweep(url: str = stack.url) -> list[measure.Load]:
                await measure.http_load(url, files, concurrency=8, requests=16)
                return [
                    await measure.http_load(url, files, concurrency=c, requests=max(n // 2, 2 * c))
                    for c in (1, 4, 16)
                ]

            for load in asyncio.run(sweep()):
                rows.append({"delay_us": delay, **load.row()})
                log(f"delay {delay} us c={load.concurrency}: {load.img_s:.2f} img/s")
    return {"rows": rows}


# --- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images per measurement (base)")
    parser.add_argument(
        "--only", choices=("vit", "engines", "families", "tiny"), help="run one part only"
    )
    parser.add_argument(
        "--concurrency", default="1,4,16,64", help="concurrent single-image requests to try"
    )
    parser.add_argument("--queue-delays", help="comma-separated delays in us: sweep only these")
    parser.add_argument("--render-only", action="store_true", help="rewrite docs from the JSON")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for benchmarks.md")
    parser.add_argument(
        "--original",
        type=Path,
        help="a checkout of lloydzhou/image-embedding-inference at 107b3f1, to measure beside ours",
    )
    args = parser.parse_args(argv)

    results_path = args.out / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not args.render_only:
        with tempfile.TemporaryDirectory(prefix="iei-bench-") as tmp:
            work = Path(tmp)
            meta = run_meta(args)
            if args.queue_delays:
                delays = [int(d) for d in args.queue_delays.split(",")]
                sweep = run_queue_delays(work, delays, args.images)
                results["queue_delay"] = {"meta": meta, **sweep}
            else:
                results["meta"] = meta
                levels = [int(c) for c in args.concurrency.split(",")]
                if args.only in (None, "vit"):
                    results["vit"] = run_vit(work, args.images, levels, original=args.original)
                if args.only in (None, "engines"):
                    model_dir = build_model("vit-base", work / "vit-base")
                    results["engines"] = run_engines(
                        load_model_module(), model_dir, make_jpegs(SMALL), args.images, work, log
                    )
                if args.only in (None, "families"):
                    files = make_jpegs(SMALL)
                    results["families"] = run_families(load_model_module(), files, args.images, log)
                if args.only in (None, "tiny"):
                    results["tiny"] = run_tiny(work, args.images, levels)
                for part in report.BENCH_PARTS:  # each part keeps the record of its own run
                    if args.only in (None, part):
                        results[part]["meta"] = meta
            meta["load_after"] = os.getloadavg()[0]
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1))
    report.write(results, args.out)
    log(f"wrote {args.out / 'benchmarks.md'}")
    if args.out == DOCS:  # the README's model guide shows the families' figures of this run
        report.update_readme(results, ROOT / "README.md")
        log("wrote the model guide in README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
