"""The original IEI service beside ours: lloydzhou/image-embedding-inference, its transformers
version (commit 107b3f1), run from a checkout outside this tree (`--original DIR`), never vendored.

It loads models only by hub id from its own list, so the run gives it the benchmark's ViT-B/16
(random weights) under the id `google/vit-base-patch16-224` in a throw-away Hugging Face cache,
offline. It is served the way its README says (its ASGI app under `--workers 4`; uvicorn's own
process manager stands in for gunicorn's UvicornWorker) and, for fairness on 2 cores, with one
worker too; the better of the two is compared.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import measure
from .workload import free_port, start_server, stop_server

MODEL_ID = "google/vit-base-patch16-224"  # the only ids it accepts are hub ids of its list
COMMIT = "107b3f1"
WORKERS = (4, 1)  # its README's command, then one process that owns both cores


def hub_cache(model_dir: Path, cache: Path, model_id: str = MODEL_ID) -> Path:
    """A Hugging Face cache in which `model_id` resolves offline to the files of `model_dir`."""
    revision = hashlib.sha1(model_id.encode()).hexdigest()  # any 40-hex name will do  # noqa: S324
    repo = cache / f"models--{model_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in model_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return cache


def server_file(checkout: Path) -> Path:
    server = checkout / "server.py"
    if not server.is_file():
        raise SystemExit(
            f"--original {checkout}: no server.py there; expected a checkout of "
            f"lloydzhou/image-embedding-inference at commit {COMMIT}"
        )
    return server


class OriginalServer:
    """The original's `server:app` under uvicorn on a free loopback port."""

    def __init__(self, checkout: Path, model_dir: Path, work: Path, workers: int) -> None:
        self.folder = work / f"original-{workers}"
        self.folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(server_file(checkout), self.folder / "server.py")
        self.workers = workers
        self.port = free_port()
        self.log_path = self.folder / "server.log"
        self.env = {
            **os.environ,
            "IMAGE_EMBEDDING_MODEL": MODEL_ID,
            "HF_HUB_CACHE": str(hub_cache(model_dir, work / "hub")),
            "HF_HUB_OFFLINE": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OriginalServer:
        command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", str(self.workers), "server:app"]
        self.process = start_server(
            "the original server", command, self.env, self.log_path, self.url, 120, self.folder
        )
        return self

    def __exit__(self, *_: object) -> None:
        stop_server(self.process, 30)


def run_original(checkout: Path, model_dir: Path, work: Path, files: list[bytes], n: int) -> dict:
    """Throughput of the original on the benchmark's 500x375 JPEGs: concurrent single-image
    requests and one large request, for each worker count."""
    rows = []
    for workers in WORKERS:
        with OriginalServer(checkout, model_dir, work, workers) as server:

            async def loads(url: str = server.url, warm: int = 4 * workers) -> list[measure.Load]:
                # It loads the model lazily in each worker, on that worker's first request: warm
                # up with many connections so that every worker has had requests before the clock.
                await measure.http_load(url, files, concurrency=warm, requests=4 * warm)
                return [
                    await measure.http_load(url, files, concurrency=16, requests=n),
                    await measure.http_load(url, files, concurrency=1, requests=1, per_request=n),
                ]

            for load in asyncio.run(loads()):
                rows.append({"workers": workers, **load.row()})
                sys.stderr.write(f"[bench] original, {workers} workers: {load.img_s:.2f} img/s\n")
    return {"commit": COMMIT, "rows": rows}
