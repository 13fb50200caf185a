"""When each model instance's current execution began: for the launcher's hang check, and on
Triton's metrics port for the frontend's /health.

Triton 2.51 neither times out an execution nor says which instance runs one. An instance that
deadlocks beside a working one (IEI_TRITON_INSTANCES >= 2) holds its batch for ever while the
other goes on answering the launcher's probes, so nothing else sees it. Each instance (one stub
process) keeps a file named by its pid in the folder the launcher names (CLOCKS_ENV), holding one
little-endian double: the CLOCK_MONOTONIC second its current execution began, 0 while it waits.
The launcher (`iei.contract`, same names) reads it beside the process's CPU time: in one
execution for long without computing is hung.

An execution that runs for seconds is also shown on Triton's metrics port (LongExecutions): a
frontend in another container or pod, which has neither the file nor the stub's /proc, reads
there that a probe held in the queue waits behind work, not behind a broken model.

No imports beyond the standard library (Triton's own module only where a stub shows the gauges):
the fault-test model uses it too.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

CLOCKS_ENV = "IEI_EXECUTION_CLOCKS"  # set by the launcher for the Triton it runs; no user setting
CLOCK_FORMAT = "<d"
IDLE = 0.0
# The gauges of LongExecutions (iei.contract: the same names), labelled by model and instance.
SECONDS_METRIC = "iei_execution_seconds"
CORES_METRIC = "iei_execution_cores"


class ExecutionClock:
    """`with clock:` around an execution; does nothing where no launcher asked for clocks (a
    Triton run by hand) or the file cannot be written."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        self.began = IDLE  # what the file holds, kept here too (LongExecutions reads it)
        self.watch: LongExecutions | None = None
        self.path: str | None = None
        self.fd: int | None = None
        folder = environ.get(CLOCKS_ENV)
        if folder:
            path = os.path.join(folder, str(os.getpid()))
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                self.path = path
                self._write(IDLE)
            except OSError:
                self.close()

    def __enter__(self) -> ExecutionClock:
        self.began = time.monotonic()
        self._write(self.began)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.began = IDLE
        self._write(IDLE)

    def _write(self, value: float) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, struct.pack(CLOCK_FORMAT, value), 0)

    def shown(self, args: Mapping[str, str]) -> ExecutionClock:
        """This clock, its long executions also shown on Triton's metrics port (Gauges; not where
        Triton runs without metrics). `args`: Triton's `initialize` args."""
        try:
            gauges = Gauges(args)
        except Exception as exc:  # metrics disabled (--allow-metrics=false)
            import triton_python_backend_utils as pb_utils

            name = args.get("model_instance_name", "this instance")
            pb_utils.Logger.log_warn(f"{name}: long executions not shown: {exc!r}")
            return self
        self.watch = LongExecutions(self, gauges, gauges.warn).start()
        return self

    def close(self) -> None:
        """At the instance's end (finalize): its file goes, its watch stops."""
        if self.watch is not None:
            self.watch.stop()
            self.watch = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None


Execute = Callable[[Any, list[Any]], list[Any]]  # a TritonPythonModel's `execute`


def clocked(execute: Execute) -> Execute:
    """A Triton model's `execute`, run within its instance's clock (`self.clock`)."""

    def run(model: Any, requests: list[Any]) -> list[Any]:
        with model.clock:
            return execute(model, requests)

    return run


Show = Callable[[float, float], None]  # (seconds so far, cores used lately): the gauges' values


class LongExecutions:
    """Shows an instance's execution once it has run SHOWN_AFTER seconds: its seconds so far and
    the cores its process used over the last WINDOW seconds of it (the process's CPU time, every
    thread's); both 0 otherwise. A daemon thread samples the clock every INTERVAL, so executions
    pay nothing and short ones never touch the gauges.

    A deadlock that holds the GIL stops the thread too, its last values standing: the seconds
    then stop growing, which is how a reader tells (the frontend compares two reads)."""

    SHOWN_AFTER = 2.0
    INTERVAL = 1.0
    WINDOW = 5.0

    def __init__(
        self, clock: ExecutionClock, show: Show, warn: Callable[[str], None] | None = None
    ) -> None:
        self.clock = clock
        self.show = show
        self.warn = warn  # where the thread says why it stopped (Triton's log)
        self.began = IDLE  # the execution the samples belong to
        self.samples: deque[tuple[float, float]] = deque()  # (monotonic, CPU seconds) in it
        self.shown = False
        self.failed: Exception | None = None  # what stopped the thread, if anything did
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="iei-long-executions", daemon=True)

    def start(self) -> LongExecutions:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(timeout=2 * self.INTERVAL)

    def _run(self) -> None:
        while not self.stopped.wait(self.INTERVAL):
            try:
                self.sample(time.monotonic(), time.process_time())
            except Exception as exc:  # Triton's metrics gone (the stub shutting down), or a bug
                self.failed = exc
                with contextlib.suppress(Exception):
                    self.show(0.0, 0.0)  # not the last values for ever
                with contextlib.suppress(Exception):
                    if self.warn is not None:
                        self.warn(f"long executions no longer shown: {exc!r}")
                return

    def sample(self, now: float, cpu: float) -> None:
        began = self.clock.began
        if began != self.began:  # another execution, or none
            self.began, self.samples = began, deque()
        if began != IDLE:
            self.samples.append((now, cpu))
            while now - self.samples[0][0] > self.WINDOW:
                self.samples.popleft()
            first, first_cpu = self.samples[0]
            if now - began >= self.SHOWN_AFTER and now > first:  # two samples at least: a rate
                self.show(now - began, (cpu - first_cpu) / (now - first))
                self.shown = True
                return
        if self.shown:  # it ended, or the next has not run long yet
            self.show(0.0, 0.0)
            self.shown = False


class Gauges:
    """LongExecutions' Show on Triton's gauges (SECONDS_METRIC, CORES_METRIC), labelled by the
    instance's model and name (Triton's `initialize` args). Kept whole: Triton drops a metric,
    or a family, with its object."""

    def __init__(self, args: Mapping[str, str]) -> None:
        import triton_python_backend_utils as pb_utils  # a stub's module: only where one runs

        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.warn: Callable[[str], None] = lambda text: pb_utils.Logger.log_warn(
            f"{labels['instance']}: {text}"
        )
        described = (
            (SECONDS_METRIC, "Seconds the instance's current execution has run, once over "
             f"{LongExecutions.SHOWN_AFTER:g} s (0: none)"),
            (CORES_METRIC, "Cores the instance's process used over the last "
             f"{LongExecutions.WINDOW:g} s of that execution (0: none)"),
        )  # fmt: skip
        gauge = pb_utils.MetricFamily.GAUGE
        self.families = [
            pb_utils.MetricFamily(name=name, description=text, kind=gauge)
            for name, text in described
        ]
        self.seconds, self.cores = (family.Metric(labels=labels) for family in self.families)

    def __call__(self, elapsed: float, used: float) -> None:
        self.seconds.set(elapsed)
        self.cores.set(used)
