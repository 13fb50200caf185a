"""Run the real stack (`iei serve`: Triton + frontend) as a child process for tests."""

from __future__ import annotations

import http.server
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
from aiohttp import web

IEI = Path(sys.executable).parent / "iei"


# The launcher's supervisor sends `iei` one real inference every 10 s (its health probe,
# launcher/triton_process.py): a test counting Triton's inferences over a window of a few seconds
# may count one of those too, but not in every window. Such a test runs its window up to this many
# times for the exact count; a real miscount shows in all of them.
COUNTING_WINDOWS = 3


_HANDED_OUT: set[int] = set()
_PORTS = random.SystemRandom()


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for a connection's own end (outgoing or bind to 0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port for a server a test starts, never one this process handed out
    before (a stack's HTTP and metrics ports once collided), and below the kernel's ephemeral
    range: between this check and the server's bind, no client connection (the suite makes
    thousands) can take it as its own end, as it could a port that bind(0) picked."""
    low = _ephemeral_low()
    candidates = range(20000, low) if low > 21000 else range(0)
    for _ in range(1000):
        port = _PORTS.choice(candidates) if candidates else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port")


@asynccontextmanager
async def aiohttp_stand_in(app: web.Application) -> AsyncIterator[str]:
    """`app` (a stand-in of Triton's HTTP API) served on a free loopback port; its `host:port`,
    as tritonclient takes it."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """`handler` served on a free loopback port from a thread, without access logs; its URL."""

    class Quiet(handler):  # type: ignore[valid-type,misc]
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def descendants(pid: int) -> set[int]:
    """All living descendants of `pid` (children are re-parented when a parent exits, so
    collect them while the tree is intact)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    """`iei serve` with a model folder (or several: `models`, IEI_MODELS' `name=folder` items),
    on free loopback ports."""

    def __init__(
        self,
        model_dir: Path | None,
        log_path: Path,
        *,
        iei: Path = IEI,
        cwd: Path | None = None,
        models: dict[str, str] | None = None,
        **env: str,
    ) -> None:
        self.iei = iei  # the `iei` command: this environment's, or one installed elsewhere
        self.cwd = cwd
        self.port = free_port()
        self.triton_http_port = free_port()
        self.triton_grpc_port = free_port()
        self.env = {
            **os.environ,
            "IMAGE_EMBEDDING_MODEL": str(model_dir) if model_dir is not None else "",
            "IEI_MODELS": ",".join(f"{name}={item}" for name, item in (models or {}).items()),
            "IEI_BIND": f"127.0.0.1:{self.port}",
            "IEI_WORKERS": "1",
            "IEI_DTYPE": "float32",
            "IEI_TRITON_HTTP_PORT": str(self.triton_http_port),
            "IEI_TRITON_GRPC_PORT": str(self.triton_grpc_port),
            "IEI_TRITON_METRICS_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def triton_http(self) -> str:
        return f"127.0.0.1:{self.triton_http_port}"

    @property
    def triton_grpc(self) -> str:
        return f"127.0.0.1:{self.triton_grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, prefix: str) -> float:
        """The sum of the frontend's /metrics samples whose line starts with `prefix` (a name,
        with labels or not); 0 when there is none."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
        )

    def start(self, timeout: float = 180.0) -> Stack:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(self.iei), "serve"],
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"iei serve exited during start-up:\n{self.log()}")
                # Started when the launcher says so: the frontend answers /health a moment
                # before the launcher's own poll sees it and logs what it serves.
                try:
                    healthy = client.get(f"{self.url}/health").status_code == 200
                except httpx.HTTPError:
                    healthy = False
                if healthy and "IEI serving" in self.log():
                    return self
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"iei serve not healthy after {timeout} s:\n{self.log()}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Stop `iei serve`; return its exit code. Raises if any process it started survives."""
        assert self.process is not None
        tree = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise RuntimeError(f"iei serve did not stop within {timeout} s") from None
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in tree if alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        if left:
            raise RuntimeError(f"processes left behind by iei serve: {left}")
        return code
