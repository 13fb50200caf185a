"""Keep Triton serving: restart it when it dies or its model's stub dies, with back-off."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .errors import TritonStartupError
from .settings import LauncherSettings
from .triton_process import TritonServer

log = logging.getLogger("iei")


class TritonSupervisor:
    """Restart Triton when it dies or its model's stub dies, with back-off; the frontend keeps
    running and answers 503 meanwhile."""

    STABLE = 60.0  # seconds up after which the back-off starts again from its minimum
    MAX_DELAY = 30.0

    def __init__(
        self,
        triton: TritonServer,
        settings: LauncherSettings,
        stopping: threading.Event,
        counted: Callable[[str], None] | None = None,
        others_running: Callable[[], bool] = lambda: True,
    ) -> None:
        self.triton = triton
        self.settings = settings
        self.stopping = stopping
        self.counted = counted  # called with the problem's reason on each restart (metrics)
        # Whether the rest of the stack (`iei serve`'s frontend) still runs: a restart that keeps
        # failing is given up once it does not, or `iei serve` served nothing for as long
        self.others_running = others_running
        self.delay = 0.0
        self.up_since = time.monotonic()

    def given_up(self) -> bool:
        return self.stopping.is_set() or not self.others_running()

    def check(self) -> None:
        problem = self.triton.problem()
        if problem is None:
            if time.monotonic() - self.up_since > self.STABLE:
                self.delay = 0.0
            return
        down_since = time.monotonic()
        log.error("%s; restarting Triton", problem)
        self.triton.restarts[problem.reason] += 1  # the next Triton shows it (its metrics port)
        if self.counted is not None:
            self.counted(problem.reason)
        while not self.given_up():
            if self.delay:
                log.info("next Triton start in %.0f s", self.delay)
                if self.stopping.wait(self.delay) or self.given_up():  # at most 30 s
                    return
            self.delay = min(max(1.0, self.delay * 2), self.MAX_DELAY)
            self.triton.stop(timeout=5.0)
            if self.given_up():  # a SIGTERM during the stop: no new Triton
                return
            try:
                self.triton.start()
                self.triton.wait_ready(self.settings.startup_timeout, self.given_up)
            except (TritonStartupError, OSError) as exc:
                if not self.given_up():
                    log.error("Triton restart failed: %s", exc)
                continue
            self.triton.watch_stubs()
            self.up_since = time.monotonic()
            log.info(
                "Triton is serving again, %.1f s after the failure", self.up_since - down_since
            )
            return
