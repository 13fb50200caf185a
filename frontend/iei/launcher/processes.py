"""Child processes of `iei serve`: they die with it and are stopped in order."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import subprocess
from pathlib import Path

log = logging.getLogger("iei")

_PR_SET_PDEATHSIG = 1
# Where POSIX shared memory objects live on Linux (shm_open).
SHM_DIR = Path("/dev/shm")  # noqa: S108


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Get `sig` when the parent dies (Linux): in a child of `iei serve` before exec, SIGKILL if
    `iei serve` itself dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)


def stop_with_supervisor() -> None:
    """In a uvicorn worker (a multiprocessing child of uvicorn's supervisor): SIGTERM, which
    uvicorn takes for a graceful stop, once the supervisor is gone. Killed outright (`iei serve`
    killed: the supervisor gets its SIGKILL), the supervisor could not stop its workers, which
    went on holding the port and their /dev/shm regions. A single uvicorn process (no
    supervisor) is left alone: its parent may be a shell that exits by design."""
    supervisor = multiprocessing.parent_process()
    if supervisor is None:
        return
    die_with_parent(signal.SIGTERM)
    if not supervisor.is_alive():  # gone before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


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
    kill_group(process)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL to the process and, as it leads its own session, whatever it started (Python
    stubs, uvicorn's workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def remove_stale_regions(prefix: str, folder: Path = SHM_DIR) -> None:
    """Regions named `<prefix><pid>-…` whose process no longer runs (killed outright): a frontend
    worker's, or with the launcher's prefix those of Triton's stubs under a killed `iei serve`."""
    named = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    for path in folder.glob(f"{prefix}*"):
        owner = named.match(path.name)
        if owner is None:
            continue
        with contextlib.suppress(OSError):  # gone meanwhile; not ours to remove (sticky /dev/shm)
            if path.stat().st_uid != os.getuid():
                continue  # another user's: its pid says nothing to us, its next start cleans it
            # A zombie is gone too: a worker killed with its supervisor waits to be reaped by
            # whoever inherits it, and kill(pid, 0) still finds it meanwhile.
            if process_state(int(owner.group(1))) in (None, "Z"):
                path.unlink()


def process_state(pid: int) -> str | None:
    """The state letter of a process (R, S, Z, ...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
