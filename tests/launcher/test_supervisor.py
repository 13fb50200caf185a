"""`iei serve`'s Triton supervisor: restarts with back-off, and never starts a Triton once a stop
was asked for. A recording stand-in replaces TritonServer; nothing here starts a process."""

from __future__ import annotations

import os
import signal
import threading

from iei.launcher.errors import TritonStartupError
from iei.launcher.settings import LauncherSettings
from iei.launcher.supervisor import TritonSupervisor
from iei.launcher.triton_process import RESTART_REASONS, Problem
from stack import free_port

EXITED = Problem("exited", "Triton exited: code -9")


class FakeTriton:
    """Records the supervisor's calls; `on_stop` runs inside stop() (e.g. a SIGTERM arriving)."""

    def __init__(self, problem: Problem | None = EXITED, fail_starts: int = 0) -> None:
        self.calls: list[str] = []
        self._problem = problem
        self.fail_starts = fail_starts
        self.on_stop = lambda: None
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)

    def problem(self) -> Problem | None:
        return self._problem

    def stop(self, timeout: float = 30.0) -> None:
        self.calls.append("stop")
        self.on_stop()

    def start(self) -> None:
        self.calls.append("start")

    def wait_ready(self, timeout: float, should_stop: object = None) -> None:
        self.calls.append("wait_ready")
        if self.fail_starts:
            self.fail_starts -= 1
            raise TritonStartupError("Triton exited during start-up")
        self._problem = None

    def watch_stubs(self) -> None:
        self.calls.append("watch_stubs")


def supervisor(
    triton: FakeTriton, stopping: threading.Event, counted: list[str] | None = None
) -> TritonSupervisor:
    count = counted.append if counted is not None else None
    return TritonSupervisor(triton, LauncherSettings(), stopping, count)  # type: ignore[arg-type]


def test_a_healthy_triton_is_left_alone():
    triton = FakeTriton(problem=None)
    supervisor(triton, threading.Event()).check()
    assert triton.calls == []


def test_a_problem_restarts_triton_and_watches_the_new_stubs():
    triton = FakeTriton()
    supervisor(triton, threading.Event()).check()
    assert triton.calls == ["stop", "start", "wait_ready", "watch_stubs"]


def test_each_restart_is_counted_once_by_its_reason_however_many_starts_it_takes(monkeypatch):
    stopping = threading.Event()
    monkeypatch.setattr(stopping, "wait", lambda delay: False)
    counted: list[str] = []
    triton = FakeTriton(Problem("stub_died", "the Python stub of model iei died"), fail_starts=2)
    supervisor(triton, stopping, counted).check()
    assert counted == ["stub_died"]
    # the Triton started next is told, for its metrics port (`iei triton` has no frontend)
    assert triton.restarts == {"exited": 0, "stub_died": 1, "stub_hung": 0, "probes_failed": 0}
    supervisor(FakeTriton(problem=None), stopping, counted).check()
    assert counted == ["stub_died"]


def test_a_failed_restart_is_retried_after_a_back_off(monkeypatch):
    stopping = threading.Event()
    waits: list[float] = []
    monkeypatch.setattr(stopping, "wait", lambda delay: waits.append(delay) or False)
    triton = FakeTriton(fail_starts=2)
    supervisor(triton, stopping).check()
    assert triton.calls.count("start") == 3
    assert waits == [1.0, 2.0]  # doubling from one second
    assert triton.calls[-1] == "watch_stubs"


def test_a_stop_asked_for_while_triton_stops_starts_no_new_triton():
    stopping = threading.Event()
    triton = FakeTriton()
    triton.on_stop = stopping.set  # SIGTERM arrives while the dead Triton is being stopped
    supervisor(triton, stopping).check()
    assert triton.calls == ["stop"]


def test_a_stop_during_the_restart_ends_the_retries_quietly(caplog):
    stopping = threading.Event()

    class StoppedWhileStarting(FakeTriton):
        def wait_ready(self, timeout: float, should_stop: object = None) -> None:
            self.calls.append("wait_ready")
            stopping.set()  # SIGTERM while Triton loads: wait_ready gives up
            raise TritonStartupError("stopped before Triton was ready")

    triton = StoppedWhileStarting()
    supervisor(triton, stopping).check()
    assert triton.calls == ["stop", "start", "wait_ready"]
    assert "restart failed" not in caplog.text


def test_a_stop_asked_for_while_the_models_are_planned_starts_no_triton(monkeypatch, tmp_path):
    """Planning asks the hub for each model's config.json (seconds offline): a SIGTERM then
    started Triton anyway, and was honoured only once the model had loaded."""
    from iei.launcher import serve

    started = []

    class PlannedDuringSigterm:
        process = None

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def plan(self) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # to run()'s own handler

        def start(self) -> None:
            started.append(True)

        def stop(self) -> None:
            pass

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    monkeypatch.setattr(serve, "TritonServer", PlannedDuringSigterm)
    monkeypatch.setattr(serve.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "work"))
    try:
        ports = {name: free_port() for name in ("triton_http_port", "triton_grpc_port")}
        settings = LauncherSettings(**ports, triton_metrics_port=free_port())
        code = serve.run(settings, with_triton=True, with_frontend=False)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert (code, started) == (0, [])


def test_a_restart_that_keeps_failing_is_given_up_once_the_frontend_has_gone(monkeypatch):
    """The restarts went on (each up to IEI_STARTUP_TIMEOUT) without a look at the frontend: a
    dead frontend left `iei serve` running and serving nothing."""
    stopping = threading.Event()
    monkeypatch.setattr(stopping, "wait", lambda delay: False)
    triton = FakeTriton(fail_starts=1000)
    watched = TritonSupervisor(
        triton, LauncherSettings(), stopping,  # type: ignore[arg-type]
        others_running=lambda: triton.calls.count("start") < 2,  # it exits during the 2nd try
    )  # fmt: skip
    watched.check()
    assert triton.calls.count("start") == 2
