"""`python -m bench.uploads`: what a raw upload saves the frontend. CPU time per image of the
frontend's processes (uvicorn workers: utime + stime from /proc) for 12 MP phone JPEGs sent as
base64 in JSON, as the file itself (`Content-Type: image/jpeg`) and as multipart forms, with the
tiny ViT (its forward pass is nearly free). The three loads alternate in rounds; the median
round per load counts, and the ratio is what a shared machine can say.

    .venv/bin/python -m bench.uploads [--rounds 5] [--requests 24]

Writes its part ("uploads") of docs/benchmarks/results.json and re-renders docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import measure, report
from .workload import ROOT, ServedStack, build_model, make_jpegs

DOCS = ROOT / "docs"
SIZE = (4000, 3000)  # a 12 MP phone photo
CONCURRENCY = 4
FORM_IMAGES = 4  # images per request of the batch loads (5 MB each: well under the payload limit)
LOADS = (
    ("json", 1, "base64 in JSON, 1 image per request"),
    ("raw", 1, "the file as the body (`image/jpeg`), 1 image per request"),
    ("json", FORM_IMAGES, f"base64 in JSON, {FORM_IMAGES} images per request"),
    ("form", FORM_IMAGES, f"a multipart form, {FORM_IMAGES} images per request"),
)


def log(message: str) -> None:
    sys.stderr.write(f"[bench.uploads {time.strftime('%H:%M:%S')}] {message}\n")


async def load(url: str, ready: list[tuple[bytes, str]], requests: int) -> float:
    """`requests` POST /embed, CONCURRENCY at a time; wall seconds."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(i: int) -> None:
            body, content_type = ready[i % len(ready)]
            headers = {"Content-Type": content_type}
            async with session.post(f"{url}/embed", data=body, headers=headers) as response:
                text = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"/embed answered {response.status}: {text[:300]!r}")

        await call(0)  # connections and first-request costs stay out of the count
        seconds, _ = await measure._drive(call, requests, CONCURRENCY)
    return seconds


def run(work: Path, rounds: int, requests: int) -> dict[str, Any]:
    files = make_jpegs(SIZE)
    model_dir = build_model("vit-tiny", work / "vit-tiny")
    ready = {(kind, n): measure.request_bodies(files, n, kind) for kind, n, _ in LOADS}
    samples: dict[tuple[str, int], list[dict[str, float]]] = {key: [] for key in ready}
    with ServedStack(model_dir, work / "vit-tiny.log") as stack:
        assert stack.process is not None
        for round_ in range(rounds):
            for kind, n, _ in LOADS:
                count = max(1, requests // n)
                before = measure.cpu_by_role(stack.process.pid)
                seconds = asyncio.run(load(stack.url, ready[(kind, n)], count))
                after = measure.cpu_by_role(stack.process.pid)
                # The warm-up request's images were sent inside the CPU window too.
                per_image = measure.cpu_per_image(before, after, (count + 1) * n)
                per_image["img_s"] = count * n / seconds
                samples[(kind, n)].append(per_image)
                frontend, rate = per_image.get("frontend", 0.0), per_image["img_s"]
                log(f"round {round_ + 1} {kind} x{n}: frontend {frontend:.0f} us/image, "
                    f"{rate:.1f} img/s")  # fmt: skip
    rows = []
    for kind, n, what in LOADS:
        runs = samples[(kind, n)]

        def median(role: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(r.get(role, 0.0) for r in runs)

        rows.append({
            "kind": kind, "per_request": n, "what": what,
            "frontend_us": median("frontend"), "triton_us": median("triton"),
            "model_us": median("model"), "client_us": median("client"), "img_s": median("img_s"),
            "frontend_rounds": [round(r.get("frontend", 0.0)) for r in runs],
        })  # fmt: skip
    return {
        "meta": {
            "command": "python -m bench.uploads " + " ".join(sys.argv[1:]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": os.getloadavg()[0],
            "rounds": rounds,
            "requests": requests,
        },
        "image": f"{SIZE[0]}x{SIZE[1]} JPEG q90, {statistics.mean(map(len, files)) / 1e6:.1f} MB",
        "rows": rows,
    }


def ratio(rows: list[dict[str, Any]], slow: str, fast: str, per_request: int) -> float | None:
    found = {r["kind"]: r["frontend_us"] for r in rows if r["per_request"] == per_request}
    return found[slow] / found[fast] if found.get(slow) and found.get(fast) else None


def section(results: dict[str, Any]) -> str:
    """docs/benchmarks.md's part: the table and the ratios."""
    meta, rows = results["meta"], results["rows"]
    table = report.table(
        ["request", "frontend us/image", "rounds (frontend us/image)", "tritonserver", "model",
         "load generator", "img/s"],
        [[r["what"], f"{r['frontend_us']:.0f}", ", ".join(map(str, r["frontend_rounds"])),
          f"{r['triton_us']:.0f}", f"{r['model_us']:.0f}", f"{r['client_us']:.0f}",
          f"{r['img_s']:.1f}"] for r in rows],
    )  # fmt: skip
    single, batch = ratio(rows, "json", "raw", 1), ratio(rows, "json", "form", FORM_IMAGES)
    said = []
    if single:
        said.append(f"**{single:.1f}x** the CPU per image on base64 JSON that it spends on the "
                    "file as the body (1 image per request)")  # fmt: skip
    if batch:
        said.append(f"**{batch:.1f}x** that on a multipart form ({FORM_IMAGES} images per request)")
    return f"""
## Raw uploads: the frontend's CPU per image (tiny ViT, 12 MP JPEGs)

`{meta["command"].strip()}`, {meta["date"]}; load average {meta["load_before"]:.1f} at the start.
{meta["rounds"]} rounds of about {meta["requests"]} images per load at concurrency {CONCURRENCY},
the loads alternating; each figure is the median round (the frontend's rounds are listed). Images:
{results["image"]}. CPU time (utime + stime, microseconds per image, in 10 ms ticks) of the
frontend's uvicorn workers, of `tritonserver`, of the model's Python stub and of the load
generator. Measured on 2 cores shared with other work: read the ratio, not the absolute figures.

The frontend spends {"; ".join(said) or "-"}. A raw upload skips the JSON parse of a multi-megabyte
string and its base64 decoding, and the copies both make; what remains per image is the request
itself (HTTP, the header check, the Triton client's own copies of the file).

{table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.uploads", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the loads, alternating")
    parser.add_argument("--requests", type=int, default=24, help="images per load and round")
    parser.add_argument("--out", type=Path, default=DOCS, help="folder for benchmarks.md")
    args = parser.parse_args(argv)
    results_path = args.out / "benchmarks" / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    with tempfile.TemporaryDirectory(prefix="iei-bench-") as tmp:
        results["uploads"] = run(Path(tmp), args.rounds, args.requests)
    rows = results["uploads"]["rows"]
    log(f"frontend CPU per image, JSON over raw: single {ratio(rows, 'json', 'raw', 1)}, "
        f"batch {ratio(rows, 'json', 'form', FORM_IMAGES)}")  # fmt: skip
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=1))
    report.write(results, args.out)
    log(f"wrote {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
