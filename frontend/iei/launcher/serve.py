"""`iei serve` (Triton and the HTTP frontend) and `iei triton` (Triton alone, the container
command) in the foreground: stopped together on SIGTERM/SIGINT or when either exits; Triton is
restarted when it, its model's stub, or its model's answers fail."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, ModuleType

from .addresses import bind_problem, url_host
from .errors import TritonStartupError
from .frontend import Frontend
from .idle import IdleUnloader
from .processes import kill_group
from .settings import LauncherSettings
from .supervisor import TritonSupervisor
from .triton_process import RESTART_REASONS, TritonServer

log = logging.getLogger("iei")

# Seconds within which a second stop signal is the first one delivered again: a signal to the
# process group reaches `iei serve` and its parent, and `make run` (or a shell) forwards its own.
# Only a later one means "stop now".
SAME_SIGNAL = 2.0


def serve(settings: LauncherSettings) -> int:
    """`iei serve`: Triton (unless IEI_TRITON_URL names one), then the frontend."""
    return run(settings, with_triton=not settings.triton_url, with_frontend=True)


def serve_triton(settings: LauncherSettings) -> int:
    """`iei triton`: Triton alone, supervised, its log on stdout too (the container's log)."""
    return run(settings, with_triton=True, with_frontend=False)


def run(settings: LauncherSettings, *, with_triton: bool, with_frontend: bool) -> int:
    # Found now, not once the model has loaded (minutes): Triton binds its ports only then.
    clash = settings.tritons_port_clash() if with_triton else None  # `iei triton` with a URL
    clash = clash or (settings.frontend_port_clash() if with_triton and with_frontend else None)
    if clash:
        log.error("invalid settings: %s", clash)
        return 2
    unbindable = listen_problem(settings, with_triton=with_triton, with_frontend=with_frontend)
    if unbindable:
        log.error("cannot start: %s", unbindable)
        return 1
    stopping = threading.Event()
    frontend: Frontend | None = None
    triton: TritonServer | None = None

    first_signal = 0.0

    def on_signal(signum: int, _: FrameType | None) -> None:
        nonlocal first_signal
        name = signal.Signals(signum).name
        if stopping.is_set() and time.monotonic() - first_signal < SAME_SIGNAL:
            return  # the same stop twice: to the process group and forwarded (`make run`)
        if stopping.is_set():  # a second Ctrl-C: the drain (up to 30 s) is not wanted
            log.warning("received %s again: stopping now, requests in flight are dropped", name)
            for child in (frontend, triton):
                if child is not None and child.process is not None:
                    kill_group(child.process)
            return
        # Marked before the log line: the same signal delivered twice at once may run this
        # handler again between the two, and was logged twice.
        first_signal = time.monotonic()
        stopping.set()
        log.info("received %s, stopping", name)
        if frontend is not None:  # at once, even while the main thread waits on a call
            frontend.request_stop()

    # SIGHUP too (a closed terminal): its default kills this process alone, and the frontend's
    # workers, which are not its children, went on holding the port.
    for stop_signal in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(stop_signal, on_signal)

    log.info("settings: %s", settings.shown())
    work_dir = Path(tempfile.mkdtemp(prefix="iei-serve-"))
    # Beside the work folder, not in it: a failed start keeps the log that the first lines name.
    log_path = work_dir.with_name(f"{work_dir.name}-triton.log")
    triton = (
        TritonServer(settings, work_dir, log_path, echo=not with_frontend) if with_triton else None
    )
    if with_frontend:
        frontend = Frontend(settings, settings.triton_endpoint, work_dir)
        log.info("frontend: %d worker(s) (%s)", frontend.workers, frontend.workers_chosen_by)
        # This process counts the unloads it decides in the frontend's /metrics (the workers'
        # multiprocess files): prometheus-client reads this when it is first imported.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(frontend.metrics_dir)
    code = 1
    try:
        if triton is not None:
            log.info("loading %s in Triton", ", ".join(m.model_id for m in settings.served))
            triton.plan()
            if stopping.is_set():  # a stop asked for while the hub was asked: no Triton
                raise TritonStartupError("stopped before Triton started")
            triton.start()
            triton.wait_ready(settings.startup_timeout, stopping.is_set)
            triton.watch_stubs()
        if frontend is not None:
            frontend.start()
            frontend.wait_healthy(60.0, stopping.is_set)
        log.info(
            "IEI serving %s%s (Triton HTTP %s, gRPC port %d)",
            ", ".join(m.name for m in settings.served),
            f" on http://{settings.bind}" if frontend else "",
            settings.triton_endpoint, settings.triton_grpc_port,
        )  # fmt: skip
        metrics = frontend_metrics(frontend)
        # A Triton that keeps failing to restart is given up once the frontend has gone too.
        others_running = frontend.running if frontend is not None else lambda: True
        supervisor = (
            TritonSupervisor(triton, settings, stopping, restart_counter(metrics), others_running)
            if triton
            else None
        )
        unloader = idle_unloader(triton, settings, metrics)
        while not stopping.wait(0.5):
            if supervisor is not None:
                supervisor.check()
            if unloader is not None and not stopping.is_set():
                unloader.check()
            if frontend is not None and not frontend.running() and not stopping.is_set():
                log.error("the HTTP frontend exited")
                return code
        code = 0
        return code
    except TritonStartupError as exc:
        if stopping.is_set():
            code = 0
            return code
        log.error("cannot start: %s", exc)
        return code
    finally:
        if frontend is not None:
            frontend.stop()
        if triton is not None:
            triton.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
        if code == 0:
            log_path.unlink(missing_ok=True)
        elif log_path.exists():
            log.info("Triton's log is kept: %s", log_path)


def listen_problem(
    settings: LauncherSettings, *, with_triton: bool, with_frontend: bool
) -> str | None:
    """Why a port this run listens on cannot be bound now (in use, an address not of this host),
    or None. A port taken between this look and the bind is still found, later."""
    listeners = {"IEI_BIND": (settings.host, settings.port)} if with_frontend else {}
    if with_triton:
        for name, port in settings.tritons_ports().items():
            listeners[name] = (settings.triton_host, port)
    for name, (host, port) in listeners.items():
        why = bind_problem(host, port)
        if why:
            where = settings.bind if name == "IEI_BIND" else f"{url_host(host)}:{port}"
            return f"{name}: nothing can listen on {where}: {why}"
    return None


def frontend_metrics(frontend: Frontend | None) -> ModuleType | None:
    """The frontend's metrics, written from this process into its workers' multiprocess folder:
    what this process decides (restarts, unloads) shows in the frontend's /metrics. None without
    a frontend (`iei triton`: its log says it all)."""
    if frontend is None:
        return None
    frontend.metrics_dir.mkdir(parents=True, exist_ok=True)
    from ..server import metrics

    return metrics


def restart_counter(metrics: ModuleType | None) -> Callable[[str], None] | None:
    """What counts the supervisor's restarts by reason; each reason shows from the start, at 0."""
    if metrics is None:
        return None
    for reason in RESTART_REASONS:
        metrics.TRITON_RESTARTS.labels(reason)
    return lambda reason: metrics.TRITON_RESTARTS.labels(reason).inc()


def idle_unloader(
    triton: TritonServer | None, settings: LauncherSettings, metrics: ModuleType | None
) -> IdleUnloader | None:
    """The owner of unloading (IEI_MODEL_IDLE_UNLOAD), where this process runs Triton; None,
    with a warning, when every model is pinned (the setting would do nothing)."""
    if triton is None or settings.model_idle_unload is None:
        return None
    if all(model.pinned for model in settings.served):
        log.warning(
            "IEI_MODEL_IDLE_UNLOAD is set, but every model is pinned (the default model always "
            "is; others with pinned=false in IEI_MODELS unload): nothing will be unloaded"
        )
        return None
    counted = None
    if metrics is not None:

        def counted(name: str) -> None:
            metrics.MODEL_UNLOADS.labels(name).inc()

    return IdleUnloader(
        triton, settings.model_idle_unload, counted, max_loaded=settings.max_loaded_models,
        in_use=settings.model_in_use_seconds,
    )  # fmt: skip
