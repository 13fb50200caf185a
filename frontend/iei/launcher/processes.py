"""Child processes of `iei serve`: they die with it and are stopped in order."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess

log = logging.getLogger("iei")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL if `iei serve` itself dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def stop_process(
    process: subprocess.Popen[bytes], sig: signal.Signals | None, timeout: float, *, name: str
) -> None:
    """Ask the process to stop with `sig` (None: it was asked already), wait up to `timeout`,
    then kill its whole group."""
    if process.poll() is None:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", name, timeout)
    # The child leads its own session: whatever it started (Python stubs, workers) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
