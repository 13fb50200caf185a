"""Faults under load: a dead model stub, a dead Triton, SIGTERM, a slow or failing model.

Each test starts its own stack, since it breaks it. Bounded in time: every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from iei.contract import EXECUTION_CORES_METRIC, EXECUTION_SECONDS_METRIC
from iei.launcher.repository import shipped_model_repository
from iei.launcher.serve import SAME_SIGNAL
from polling import eventually, wait_for
from prometheus_client.parser import text_string_to_metric_families
from sample_images import photos
from stack import Stack, alive, descendants

pytestmark = pytest.mark.integration

FAULT_MODEL = Path(__file__).resolve().parents[1] / "fault_model"
IMAGE = base64.b64encode(photos()["chelsea.jpg"]).decode()
REQUEST_TIMEOUT = 10.0


@dataclass
class Answer:
    sent: float
    seconds: float
    status: int  # 0: no HTTP answer (connection refused or dropped)
    json: bool


@dataclass
class Load:
    """Concurrent single-image /embed requests from a background thread until stopped."""

    url: str
    clients: int = 4
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    in_flight: set[float] = field(default_factory=set)  # when each unanswered request was sent

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(REQUEST_TIMEOUT + 10)

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=REQUEST_TIMEOUT + 5) as client:
            await asyncio.gather(*(self._client(client) for _ in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            self.in_flight.add(sent)
            try:
                response = await client.post("/embed", json={"inputs": IMAGE})
                is_json = response.headers.get("content-type", "").startswith("application/json")
                self.answers.append(
                    Answer(sent, time.monotonic() - sent, response.status_code, is_json)
                )
            except httpx.HTTPError:
                self.answers.append(Answer(sent, time.monotonic() - sent, 0, False))
                await asyncio.sleep(0.05)
            finally:
                self.in_flight.discard(sent)

    def wait_for_success_streak(self, since: float, seconds: float, deadline: float) -> float:
        """Wait for `seconds` of nothing but 200s, all sent after `since` and after the last
        failure, with no earlier request still unanswered (it may yet fail); return when the
        streak began."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            time.sleep(0.5)
            answers = list(self.answers)
            last_failure = max((a.sent for a in answers if a.status != 200), default=since)
            begun = max(since, last_failure)
            streak = [a.sent for a in answers if a.sent > begun]
            if (
                streak
                and time.monotonic() - min(streak) > seconds
                and min(self.in_flight, default=begun + 1) > begun
            ):
                return min(streak)
        raise AssertionError(f"no {seconds} s of full success within {deadline} s")


def stub_pids(stack: Stack) -> list[int]:
    return [
        pid
        for pid in descendants(stack.process.pid)
        if b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def process_running(stack: Stack, fragment: bytes) -> int:
    """The pid of the process under `iei serve` whose command line contains `fragment`."""
    for pid in sorted(descendants(stack.process.pid)):
        try:
            if fragment in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no {fragment!r} process under iei serve")


@pytest.fixture
def fault_stack(model_dirs, tmp_path):
    stack = Stack(
        model_dirs["vit"],
        tmp_path / "serve.log",
        IEI_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT),
        IEI_CACHE_MB="0",  # the load repeats its images: every request must reach Triton
    ).start()
    yield stack
    assert stack.stop() == 0, stack.log()


def assert_clean_failures(load: Load) -> None:
    """Every answer was a 200 or a JSON 5xx (or a refused connection), none past the timeout."""
    bad = [a for a in load.answers if a.status not in (200, 0) and not (a.status >= 500 and a.json)]
    assert not bad, bad[:5]
    slow = [a for a in load.answers if a.seconds > REQUEST_TIMEOUT + 2]
    assert not slow, slow[:5]


def restarts(stack: Stack, reason: str) -> float:
    return stack.metric(f'iei_triton_restarts_total{{reason="{reason}"}}')


def test_a_dead_model_stub_is_noticed_and_service_restored(fault_stack):
    health = f"{fault_stack.url}/health"
    # every reason shows from the start, at 0 (a dashboard's rate() needs the series)
    assert [restarts(fault_stack, r) for r in ("exited", "stub_died", "probes_failed")] == [0] * 3
    assert (
        'iei_triton_restarts_total{reason="probes_failed"}'
        in httpx.get(f"{fault_stack.url}/metrics").text
    )
    with Load(fault_stack.url) as load:
        time.sleep(1.5)
        [stub] = stub_pids(fault_stack)
        killed = time.monotonic()
        os.kill(stub, signal.SIGKILL)
        saw_unhealthy = False
        for _ in range(40):  # /health must not keep saying 200 while inference fails
            if httpx.get(health, timeout=15).status_code == 503:
                saw_unhealthy = True
                break
            time.sleep(0.25)
        recovered = load.wait_for_success_streak(killed, seconds=3, deadline=90)
    assert saw_unhealthy
    assert_clean_failures(load)
    failures = [a for a in load.answers if a.status != 200]
    assert failures, "killing the stub went unnoticed by the load"
    assert "restarting Triton" in fault_stack.log()
    assert "stub" in fault_stack.log()
    assert httpx.get(health).status_code == 200
    assert restarts(fault_stack, "stub_died") == 1
    # Triton's own metrics port says so too: where `iei triton` runs it (compose, Kubernetes)
    # the frontend's /metrics is another container's, and the scrape annotation names this port.
    triton_metrics = httpx.get(
        f"http://127.0.0.1:{fault_stack.env['IEI_TRITON_METRICS_PORT']}/metrics", timeout=10
    ).text
    assert 'iei_triton_restarts{reason="stub_died"} 1' in triton_metrics, triton_metrics
    assert 'iei_triton_restarts{reason="exited"} 0' in triton_metrics
    print(f"stub killed: service back {recovered - killed:.1f} s later")  # noqa: T201


def test_a_dead_triton_is_restarted_without_restarting_the_frontend(fault_stack):
    frontend = process_running(fault_stack, b"-m\0uvicorn")
    exits = restarts(fault_stack, "exited")
    with Load(fault_stack.url) as load:
        time.sleep(1.5)
        triton = process_running(fault_stack, b"bin/tritonserver")
        killed = time.monotonic()
        os.kill(triton, signal.SIGKILL)
        time.sleep(0.5)
        down = httpx.get(f"{fault_stack.url}/health", timeout=5)
        assert down.status_code == 503
        assert down.json()["error_type"] == "Unhealthy"
        recovered = load.wait_for_success_streak(killed, seconds=3, deadline=90)
    assert_clean_failures(load)
    refused_quickly = [a for a in load.answers if a.status == 503 and a.seconds < 2]
    assert refused_quickly, "no quick 503 while Triton was down"
    assert process_running(fault_stack, b"-m\0uvicorn") == frontend
    assert "Triton exited" in fault_stack.log()
    assert "Triton is serving again" in fault_stack.log()
    assert restarts(fault_stack, "exited") == exits + 1
    print(f"tritonserver killed: service back {recovered - killed:.1f} s later")  # noqa: T201


def fault_model_stack(tmp_path: Path, behaviour: str, **env: str) -> Stack:
    model = tmp_path / "unused-model"
    model.mkdir()
    return Stack(
        model,
        tmp_path / "serve.log",
        IEI_MODEL_REPOSITORY=str(FAULT_MODEL),
        IEI_TEST_BEHAVIOUR=behaviour,
        IEI_TEST_RUNTIME=str(shipped_model_repository()),
        IEI_CACHE_MB="0",  # repeated inputs must reach the faulty model, not the cache
        **env,
    )


def test_a_long_execution_that_computes_is_not_taken_for_a_hung_model(tmp_path):
    """One execution that computes for a minute holds the launcher's probes (10 s each, 3
    failures in a row restart Triton) and the frontend's (2 s): they wait behind a model at work,
    not a hung one. /health stays 200 throughout: past the 30 s in which the model's last
    completed request vouches for it (it read 503 from then on), because Triton's metrics port
    shows the execution's seconds growing and its process computing. Its answer comes back from
    the same Triton."""
    stack = fault_model_stack(tmp_path, "spin:60", IEI_REQUEST_TIMEOUT="120").start(timeout=120)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sent = request_in_flight(stack, pool, timeout=150)
            health = health_while(stack, seconds=50)
            seconds, cores = long_executions(stack)["iei_0_0"]
            response = sent.result()
        assert response.status_code == 200, response.text
        assert set(health) == {200}, health
        assert seconds >= 40 and cores >= 0.5, (seconds, cores)
        over = lambda: long_executions(stack)["iei_0_0"] == (0.0, 0.0)  # noqa: E731
        wait_for(over, "the execution shown as over", 5)
        log = stack.log()
        assert "restarting Triton" not in log, log
        assert "the model is busy" in log, log
        assert "a health probe waits behind an execution" in log, log
    finally:
        assert stack.stop() == 0


def health_while(stack: Stack, seconds: float) -> list[int]:
    """/health's statuses, every 2 s for `seconds`."""
    statuses = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        statuses.append(httpx.get(f"{stack.url}/health", timeout=10).status_code)
        time.sleep(2)
    return statuses


def long_executions(stack: Stack) -> dict[str, tuple[float, float]]:
    """Triton's metrics port: instance -> (iei_execution_seconds, iei_execution_cores)."""
    port = stack.env["IEI_TRITON_METRICS_PORT"]
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (EXECUTION_SECONDS_METRIC, EXECUTION_CORES_METRIC):
            for sample in family.samples:
                found.setdefault(sample.labels["instance"], {})[family.name] = sample.value
    return {
        instance: (values[EXECUTION_SECONDS_METRIC], values[EXECUTION_CORES_METRIC])
        for instance, values in found.items()
    }


def test_executions_longer_than_a_probe_one_after_another_are_load_not_a_hung_model(tmp_path):
    """Executions of 12 s behind a full queue hold every probe past its 10 s, the next batch taking
    it in, and use no CPU (a sleep, as a GPU's wait): the model answers them (Triton's
    statistics), so it is busy, not hung; it used to be restarted after three probes."""
    stack = fault_model_stack(tmp_path, "sleep:12", IEI_REQUEST_TIMEOUT="120").start(timeout=120)
    until = time.monotonic() + 50

    def client() -> list[int]:
        codes = []
        while time.monotonic() < until:
            codes.append(httpx.post(f"{stack.url}/embed", json={"inputs": IMAGE}, timeout=150))
        return [response.status_code for response in codes]

    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answered = [code for codes in pool.map(lambda _: client(), range(3)) for code in codes]
        log = stack.log()
        assert "restarting Triton" not in log, log
        assert "other requests were answered" in log, log
        assert set(answered) == {200}, answered
    finally:
        assert stack.stop() == 0


def refuses_connections(stack: Stack) -> bool:
    host, port = stack.url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:  # a timeout while the listener closes: ask again
        return False
    return False


def test_sigterm_drains_accepted_requests_and_refuses_new_ones(tmp_path):
    stack = fault_model_stack(tmp_path, "sleep:2").start(timeout=120)

    async def during_shutdown() -> tuple[list[int], list[str]]:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
            accepted = [
                asyncio.create_task(client.post("/embed", json={"inputs": IMAGE})) for _ in range(6)
            ]
            # All six in the model's 2 s sleep (the scrape counts itself too), then the signal.
            await eventually(
                lambda: stack.metric("iei_requests_in_flight") >= 7,
                "the six requests in flight", 20, blocking=True,
            )  # fmt: skip
            stack.process.send_signal(signal.SIGTERM)
            closed = functools.partial(refuses_connections, stack)
            await eventually(closed, "the port closed", 20, blocking=True)
            late = []
            try:
                response = await client.post("/embed", json={"inputs": IMAGE})
                late.append(f"answered {response.status_code} {response.text[:100]}")
            except httpx.HTTPError as exc:
                late.append(type(exc).__name__)
            return [r.status_code for r in await asyncio.gather(*accepted)], late

    statuses, late = asyncio.run(during_shutdown())
    assert statuses == [200] * 6
    assert late == ["ConnectError"]
    assert stack.stop() == 0  # already stopping: exits 0 and leaves no process behind


def request_in_flight(
    stack: Stack, pool: concurrent.futures.ThreadPoolExecutor, timeout: float = 60
) -> concurrent.futures.Future[httpx.Response]:
    """One /embed request, returned once it is in the model (the scrape counts itself too)."""
    sent = pool.submit(httpx.post, f"{stack.url}/embed", json={"inputs": IMAGE}, timeout=timeout)
    wait_for(lambda: stack.metric("iei_requests_in_flight") >= 2, "the request", 20)
    return sent


def test_an_instance_hung_beside_a_working_one_restarts_triton(tmp_path):
    """One of two instances deadlocks (here: an execution that sleeps, computing nothing) while
    the other answers the launcher's probes, so the probes never failed: its batch waited for
    ever, a share of the capacity gone. The instance's execution clock and CPU time show it."""
    stack = fault_model_stack(
        tmp_path, "sleep:600", IEI_TRITON_INSTANCES="2", IEI_REQUEST_TIMEOUT="5"
    ).start(timeout=120)
    try:
        response = httpx.post(f"{stack.url}/embed", json={"inputs": [IMAGE]}, timeout=60)
        assert response.status_code == 504, response.text
        assert httpx.get(f"{stack.url}/health").status_code == 200  # the other instance answers
        # Triton's metrics port shows it in one execution, computing nothing (what /health reads)
        [(seconds, cores)] = [v for v in long_executions(stack).values() if v != (0.0, 0.0)]
        assert seconds >= 2 and cores < 0.2, (seconds, cores)
        wait_for(lambda: "restarting Triton" in stack.log(), "a restart", 150, every=1.0,
                 log=stack.log)  # fmt: skip
        assert "an instance of model iei (pid " in stack.log()
        assert "s of them without computing; restarting Triton" in stack.log()
        wait_for(lambda: "Triton is serving again" in stack.log(), "Triton back", 120, 1.0)
        assert stack.metric('iei_triton_restarts_total{reason="stub_hung"}') == 1
        assert stack.metric('iei_triton_restarts_total{reason="probes_failed"}') == 0
    finally:
        stack.stop()


def test_a_second_signal_stops_at_once_dropping_the_requests_in_flight(tmp_path):
    """Ctrl-C twice: the first drains for up to 30 s; the second need not wait for it."""
    stack = fault_model_stack(tmp_path, "sleep:30", IEI_REQUEST_TIMEOUT="60").start(timeout=120)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = request_in_flight(stack, pool)
        stack.process.send_signal(signal.SIGTERM)
        first = time.monotonic()
        wait_for(functools.partial(refuses_connections, stack), "the port closed", 20)
        time.sleep(max(0.0, SAME_SIGNAL + 0.5 - (time.monotonic() - first)))  # not a repeat
        started = time.monotonic()
        assert stack.stop(signal.SIGINT, timeout=15) == 0  # raises if a process is left
        assert time.monotonic() - started < 10
        with pytest.raises(httpx.HTTPError):
            in_flight.result()
    assert "received SIGINT again: stopping now" in stack.log()


def test_one_stop_delivered_twice_at_once_still_drains(tmp_path):
    """`make run` stopped by a signal to its process group: `iei serve` gets it, and make
    forwards it again at once. That is one stop, not Ctrl-C twice: the request in flight is
    answered (the second signal cut it off)."""
    stack = fault_model_stack(tmp_path, "sleep:3", IEI_REQUEST_TIMEOUT="60").start(timeout=120)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = request_in_flight(stack, pool)
        stack.process.send_signal(signal.SIGTERM)
        assert stack.stop(signal.SIGTERM, timeout=45) == 0  # the second, at once
        assert in_flight.result().status_code == 200
    assert "again" not in stack.log()
    regions = Path("/dev/shm").glob("iei-frontend-*")
    assert not [p.name for p in regions if not alive(int(p.name.split("-")[2]))]


def test_iei_serve_killed_outright_leaves_no_worker_holding_the_port(tmp_path):
    """SIGKILL to `iei serve` (an OOM kill, `kill -9`): its children get SIGKILL from the kernel,
    and uvicorn's workers, its supervisor's children, SIGTERM when the supervisor goes. They used
    to live on, holding the port (503 for every request) and their /dev/shm regions."""
    stack = fault_model_stack(tmp_path, "", IEI_WORKERS="2").start(timeout=120)
    try:
        workers = [pid for pid in descendants(stack.process.pid) if uvicorn_worker(pid)]
        assert len(workers) == 2, workers
        response = httpx.post(f"{stack.url}/embed", json={"inputs": IMAGE}, timeout=30)
        assert response.status_code == 200
        everyone = Path("/dev/shm").glob("iei-frontend-*")  # other stacks' too
        regions = [p.name for p in everyone if int(p.name.split("-")[2]) in workers]
        assert regions, "the workers' regions"
    finally:
        stack.stop(signal.SIGKILL)  # raises if any process it started is left after 10 s
    assert refuses_connections(stack)
    assert not [name for name in regions if Path("/dev/shm", name).exists()]


def uvicorn_worker(pid: int) -> bool:
    """Whether `pid` is a uvicorn worker (spawned by multiprocessing), not its supervisor or
    multiprocessing's resource tracker."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_slow_model_ends_in_504_at_the_request_timeout(tmp_path):
    stack = fault_model_stack(tmp_path, "sleep:6", IEI_REQUEST_TIMEOUT="1").start(timeout=120)
    try:
        started = time.monotonic()
        response = httpx.post(f"{stack.url}/embed", json={"inputs": IMAGE}, timeout=30)
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json()["error_type"] == "Timeout"
        assert elapsed < 5  # at the 1 s timeout, not after the model's 6 s
    finally:
        assert stack.stop() == 0


def test_a_failing_model_is_424_backend(tmp_path):
    stack = fault_model_stack(tmp_path, "fail").start(timeout=120)
    try:
        response = httpx.post(f"{stack.url}/embed", json={"inputs": IMAGE}, timeout=30)
        assert response.status_code == 424
        assert response.json()["error_type"] == "Backend"
        assert "the model broke" in response.json()["error"]
    finally:
        assert stack.stop() == 0
