"""The HTTP frontend as a child of `iei serve`: uvicorn with IEI_WORKERS worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from ..contract import FRONTEND_REGIONS
from .addresses import dial_endpoint, local_client
from .errors import TritonStartupError
from .processes import die_with_parent, remove_stale_regions, stop_process
from .repository import available_cores, gpu_count, shipped_model_repository
from .settings import LauncherSettings

# Seconds uvicorn gives requests in flight to finish after SIGTERM.
GRACEFUL_SHUTDOWN = 30
# The ASGI application every worker builds (docker/frontend.Dockerfile runs the same).
APP_FACTORY = "iei.server.app:create_app"


# IEI_WORKERS=auto. A worker is one event loop, and it spends 1.1-1.4 ms of CPU on a single-image
# request (bench/notes.py: 16 concurrent uploads, 2-core EPYC), so it answers at most about 800 of
# them a second. Where the CPU runs the model, the forward pass is the bound long before that, and
# every worker keeps a content cache and limits of its own: 2 workers. Where a GPU runs it, the
# frontend's CPU sets the rate (5,000 single images a second need 6 to 7 workers): a worker per 2
# cores. The cores are shared with Triton's preprocessing and encoders; each is busy part of the
# time (the GPU decodes plain JPEGs), and an idle worker costs only its memory.
CPU_HOST_WORKERS = 2
GPU_HOST_CORES_PER_WORKER = 2
MAX_AUTO_WORKERS = 16


def auto_workers(cores: int, gpus: int) -> int:
    """The frontend's worker processes for IEI_WORKERS=auto on a host with `cores` and `gpus`."""
    if gpus == 0:
        return CPU_HOST_WORKERS
    return max(CPU_HOST_WORKERS, min(MAX_AUTO_WORKERS, cores // GPU_HOST_CORES_PER_WORKER))


def frontend_workers(settings: LauncherSettings) -> tuple[int, str]:
    """IEI_WORKERS as a count, and how it was chosen (for the log)."""
    if settings.workers != "auto":
        return int(settings.workers), "IEI_WORKERS"
    # Counted by the shipped repository's rule (affinity and cgroup quota) whatever
    # IEI_MODEL_REPOSITORY holds: the workers are this package's processes.
    cores, gpus = available_cores(shipped_model_repository()), gpu_count()
    where = f"{gpus} GPU(s), {cores} cores" if gpus else "no GPU"
    return auto_workers(cores, gpus), f"auto: {where}"


def uvicorn_arguments(host: str, port: int, workers: int | str) -> list[str]:
    """uvicorn's flags for the frontend, shared with the frontend image's command."""
    return [
        APP_FACTORY, "--factory", "--host", host, "--port", str(port),
        "--workers", str(workers), "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN),
        "--no-access-log",
    ]  # fmt: skip


class Frontend:
    """The uvicorn process (with IEI_WORKERS workers) serving `iei.server.app:create_app`."""

    def __init__(self, settings: LauncherSettings, triton_endpoint: str, work_dir: Path) -> None:
        self.settings = settings
        self.triton_endpoint = triton_endpoint
        self.metrics_dir = work_dir / "metrics"
        self.process: subprocess.Popen[bytes] | None = None
        self.stop_requested = False
        self.workers, self.workers_chosen_by = frontend_workers(settings)

    @property
    def local_url(self) -> str:
        return f"http://{dial_endpoint(self.settings.host, self.settings.port)}"

    def start(self) -> None:
        settings = self.settings
        command = [
            sys.executable, "-m", "uvicorn",
            *uvicorn_arguments(settings.host, settings.port, self.workers),
        ]  # fmt: skip
        # Workers are processes: their metrics meet in files that /metrics adds up.
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "IEI_TRITON_URL": self.triton_endpoint,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        if settings.triton_metrics_endpoint:  # its own Triton: /health reads long executions
            env["IEI_TRITON_METRICS_URL"] = settings.triton_metrics_endpoint
        self.process = subprocess.Popen(  # noqa: S603 (our own argv, no shell)
            command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        with local_client(10.0) as client:  # /health may run a probe inference
            while time.monotonic() < deadline:
                if should_stop():
                    raise TritonStartupError("stopped before the frontend was healthy")
                if not self.running():
                    raise TritonStartupError("the HTTP frontend exited during start-up")
                try:
                    if client.get(f"{self.local_url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise TritonStartupError(f"the HTTP frontend was not healthy after {timeout:.0f} s")

    def request_stop(self) -> None:
        """Begin uvicorn's graceful shutdown: stop accepting, finish what was accepted. Only
        once: a second SIGTERM makes uvicorn drop the requests in flight."""
        if self.process is not None and not self.stop_requested and self.running():
            self.stop_requested = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process is not None:
            self.request_stop()
            stop_process(self.process, None, GRACEFUL_SHUTDOWN + 5, name="frontend")
            remove_stale_regions(FRONTEND_REGIONS)  # of workers that had to be killed
