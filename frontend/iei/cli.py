"""The `iei` command. `iei serve` runs Triton and the HTTP frontend in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import httpx
from pydantic import ValidationError

from . import __version__, bulk_cli
from .processes import die_with_parent, stop_process
from .settings import Settings
from .triton_server import (
    TritonServer,
    TritonStartupError,
    gpu_count,
    model_environment,
    render_model_repository,
    triton_command,
)

log = logging.getLogger("iei")

# Seconds uvicorn gives requests in flight to finish after SIGTERM.
GRACEFUL_SHUTDOWN = 30


class Frontend:
    """The uvicorn process (with IEI_WORKERS workers) serving `iei.app:create_app`."""

    def __init__(self, settings: Settings, triton_endpoint: str, work_dir: Path) -> None:
        self.settings = settings
        self.triton_endpoint = triton_endpoint
        self.metrics_dir = work_dir / "metrics"
        self.process: subprocess.Popen[bytes] | None = None
        self.stop_requested = False

    @property
    def local_url(self) -> str:
        host = self.settings.host
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104 (a mapping, not a bind)
        return (
            f"http://[{host}]:{self.settings.port}"
            if ":" in host
            else (f"http://{host}:{self.settings.port}")
        )

    def start(self) -> None:
        command = [
            sys.executable, "-m", "uvicorn", "iei.app:create_app", "--factory",
            "--host", self.settings.host, "--port", str(self.settings.port),
            "--workers", str(self.settings.workers),
            "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN),
            "--no-access-log",
        ]  # fmt: skip
        # Workers are processes: their metrics meet in files that /metrics adds up.
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "IEI_TRITON_URL": self.triton_endpoint,
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        }
        self.process = subprocess.Popen(  # noqa: S603 (our own argv, no shell)
            command, env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_healthy(self, timeout: float, should_stop: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=10.0) as client:  # /health may run a probe inference
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


class TritonSupervisor:
    """Restart Triton when it dies or its model's stub dies, with back-off; the frontend keeps
    running and answers 503 meanwhile."""

    STABLE = 60.0  # seconds up after which the back-off starts again from its minimum
    MAX_DELAY = 30.0

    def __init__(self, triton: TritonServer, settings: Settings, stopping: threading.Event):
        self.triton = triton
        self.settings = settings
        self.stopping = stopping
        self.delay = 0.0
        self.up_since = time.monotonic()

    def check(self) -> None:
        problem = self.triton.problem()
        if problem is None:
            if time.monotonic() - self.up_since > self.STABLE:
                self.delay = 0.0
            return
        down_since = time.monotonic()
        log.error("%s; restarting Triton", problem)
        while not self.stopping.is_set():
            if self.delay:
                log.info("next Triton start in %.0f s", self.delay)
                if self.stopping.wait(self.delay):
                    return
            self.delay = min(max(1.0, self.delay * 2), self.MAX_DELAY)
            self.triton.stop(timeout=5.0)
            if self.stopping.is_set():  # a SIGTERM during the stop: no new Triton
                return
            try:
                self.triton.start()
                self.triton.wait_ready(self.settings.startup_timeout, self.stopping.is_set)
            except (TritonStartupError, OSError) as exc:
                if not self.stopping.is_set():
                    log.error("Triton restart failed: %s", exc)
                continue
            self.triton.watch_stubs()
            self.up_since = time.monotonic()
            log.info(
                "Triton is serving again, %.1f s after the failure", self.up_since - down_since
            )
            return


def serve(settings: Settings) -> int:
    """Triton, then the frontend; stop both on SIGTERM/SIGINT or when either exits."""
    stopping = threading.Event()
    frontend: Frontend | None = None

    def on_signal(signum: int, _: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()
        if frontend is not None:  # at once, even while the main thread waits on a call
            frontend.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    shown = settings.model_dump(mode="json", exclude={"api_key"})
    shown["api_key"] = "set (hidden)" if settings.api_key else None
    log.info("settings: %s", shown)
    work_dir = Path(tempfile.mkdtemp(prefix="iei-serve-"))
    triton = None if settings.triton_url else TritonServer(settings, work_dir)
    frontend = Frontend(settings, settings.triton_endpoint, work_dir)
    try:
        if triton is not None:
            log.info("loading %s in Triton", settings.embedding_model)
            triton.start()
            triton.wait_ready(settings.startup_timeout, stopping.is_set)
            triton.watch_stubs()
        frontend.start()
        frontend.wait_healthy(60.0, stopping.is_set)
        log.info(
            "IEI serving %s on http://%s (Triton HTTP %s, gRPC port %d)",
            settings.embedding_model, settings.bind, settings.triton_endpoint,
            settings.triton_grpc_port,
        )  # fmt: skip
        supervisor = TritonSupervisor(triton, settings, stopping) if triton else None
        while not stopping.wait(0.5):
            if supervisor is not None:
                supervisor.check()
            if not frontend.running() and not stopping.is_set():
                log.error("the HTTP frontend exited")
                return 1
        return 0
    except TritonStartupError as exc:
        if stopping.is_set():
            return 0
        log.error("cannot start: %s", exc)
        return 1
    finally:
        frontend.stop()
        if triton is not None:
            triton.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def run_triton(settings: Settings) -> int:
    """`iei triton`: render the model repository for this machine, then become `tritonserver`.

    The container command of docker compose and Kubernetes; exec keeps Triton the process that
    receives SIGTERM, and its arguments are those of `iei serve`.
    """
    try:
        repository = render_model_repository(
            settings.model_repository,
            Path(tempfile.mkdtemp(prefix="iei-triton-")) / "model_repository",
            gpus=gpu_count(),
            instances=settings.triton_instances,
        )
        env = {**os.environ, **model_environment(settings)}
    except TritonStartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    command = triton_command(settings, repository)
    log.info("exec %s", " ".join(command))
    try:
        os.execvpe(command[0], command, env)  # noqa: S606 (becomes tritonserver)
    except OSError as exc:  # only returns on failure
        log.error("cannot start %s: %s (iei triton runs in the Triton image)", command[0], exc)
    return 127


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            env = "IMAGE_EMBEDDING_MODEL" if name == "embedding_model" else f"IEI_{name.upper()}"
            log.error("invalid setting %s: %s", env, error["msg"])
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="iei", description="Image Embedding Inference")
    parser.add_argument("--version", action="version", version=f"iei {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="run Triton and the HTTP frontend in the foreground",
        description="Run Triton Inference Server and the HTTP frontend; settings come from "
        "the environment (IMAGE_EMBEDDING_MODEL, IEI_*), see the README.",
    )
    commands.add_parser(
        "triton",
        help="run Triton alone in the foreground (the container command)",
        description="Render the model repository for this machine (CPU instances without a "
        "GPU) and exec tritonserver with the launch arguments of `iei serve`.",
    )
    bulk_cli.add_embed_arguments(
        commands.add_parser(
            "embed",
            help="embed image files and folders through a running service into a file",
            description="Embed every image under PATH... through a running IEI service and "
            "write the vectors to --out (.jsonl, .npy + .ids.json, or .parquet).",
        )
    )
    bulk_cli.add_similar_arguments(
        commands.add_parser(
            "similar",
            help="the images of an `iei embed` file nearest to a query image",
            description="Embed QUERY_IMAGE through the service and print the --top paths of "
            "--index with the highest cosine similarity.",
        )
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s iei: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    if args.command == "serve":
        return serve(load_settings())
    if args.command == "triton":
        return run_triton(load_settings())
    if args.command in ("embed", "similar"):
        return bulk_cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
