"""When each model instance's current execution began, for the launcher's hang check.

Triton 2.51 neither times out an execution nor says which instance runs one. An instance that
deadlocks beside a working one (IEI_TRITON_INSTANCES >= 2) holds its batch for ever while the
other goes on answering the launcher's probes, so nothing else sees it. Each instance (one stub
process) keeps a file named by its pid in the folder the launcher names (CLOCKS_ENV), holding one
little-endian double: the CLOCK_MONOTONIC second its current execution began, 0 while it waits.
The launcher (`iei.contract`, same names) reads it beside the process's CPU time: in one
execution for long without computing is hung.

No imports beyond the standard library: the fault-test model uses it too.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

CLOCKS_ENV = "IEI_EXECUTION_CLOCKS"  # set by the launcher for the Triton it runs; no user setting
CLOCK_FORMAT = "<d"
IDLE = 0.0


class ExecutionClock:
    """`with clock:` around an execution; does nothing where no launcher asked for clocks (a
    Triton run by hand) or the file cannot be written."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
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
        self._write(time.monotonic())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._write(IDLE)

    def _write(self, value: float) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, struct.pack(CLOCK_FORMAT, value), 0)

    def close(self) -> None:
        """At the instance's end (finalize): its file goes."""
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
