"""A bounded load test on loopback: N clients for T seconds against the tiny model.

    make load                                  # 16 clients, 120 s
    LOAD_CLIENTS=32 LOAD_SECONDS=300 make load

Reports throughput, latency percentiles, errors, and the resident memory of the frontend workers
and the Triton processes after warm-up and at the end (a leak shows as growth between the two).
Prints a Markdown section for docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from sample_images import photos
from stack import Stack, descendants
from tiny_models import build_tiny_model


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def process_groups(stack: Stack) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {"frontend": [], "triton": []}
    for pid in descendants(stack.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"tritonserver" in command or b"triton_python_backend_stub" in command:
            groups["triton"].append(pid)
        elif b"uvicorn" in command or b"multiprocessing" in command:
            groups["frontend"].append(pid)
    return groups


async def drive(url: str, clients: int, seconds: float) -> tuple[list[float], dict[int, int]]:
    bodies = [{"inputs": base64.b64encode(data).decode()} for data in photos().values()]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    end = time.monotonic() + seconds

    async def client(n: int, http: httpx.AsyncClient) -> None:
        i = n
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                status = (await http.post("/embed", json=bodies[i % len(bodies)])).status_code
            except httpx.HTTPError:
                status = 0
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            i += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(n, http) for n in range(clients)))
    return latencies, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="iei-load-") as tmp:
        model = build_tiny_model("vit", Path(tmp) / "vit")
        stack = Stack(model, Path(tmp) / "serve.log", IEI_WORKERS=str(args.workers)).start()
        try:
            asyncio.run(drive(stack.url, args.clients, min(10.0, args.seconds)))  # warm-up
            groups = process_groups(stack)
            before = {name: rss_mib(pids) for name, pids in groups.items()}
            started = time.monotonic()
            latencies, statuses = asyncio.run(drive(stack.url, args.clients, args.seconds))
            elapsed = time.monotonic() - started
            groups = process_groups(stack)
            after = {name: rss_mib(pids) for name, pids in groups.items()}
        finally:
            code = stack.stop()

    total = len(latencies)
    errors = total - statuses.get(200, 0)
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    lines = [
        f"- command: `make load` with `LOAD_CLIENTS={args.clients} LOAD_SECONDS={args.seconds:g}` "
        f"({args.workers} frontend workers, tiny ViT, single-image requests of the sample photos)",
        f"- machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
        "| requests | seconds | requests/s | p50 ms | p95 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {total} | {elapsed:.0f} | {total / elapsed:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} "
        f"| {errors} {dict(sorted(statuses.items())) if errors else ''} |",
        "",
        "| resident memory (MiB) | after warm-up | at the end | change |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("frontend", "triton"):
        lines.append(
            f"| {name} | {before[name]:.0f} | {after[name]:.0f} | "
            f"{after[name] - before[name]:+.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if errors == 0 and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
