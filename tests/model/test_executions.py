"""Each model instance's execution clock (iei_runtime/executions.py), which the launcher reads to
find an instance hung in one execution: what the file holds while it waits, while it executes,
after an execution that failed, and once the instance ends."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
from fake_pb_utils import install
from iei.contract import EXECUTION_CLOCK_FORMAT, EXECUTION_CLOCKS_ENV
from iei.launcher.triton_process import execution_began

install()  # iei_runtime on sys.path

from iei_runtime.executions import ExecutionClock, clocked  # noqa: E402


class Model:
    def __init__(self, environ: dict[str, str]) -> None:
        self.clock = ExecutionClock(environ)
        self.seen: float | None = None

    @clocked
    def execute(self, requests: list[object]) -> list[object]:
        path = self.clock.path
        self.seen = execution_began(Path(path)) if path else None
        if requests == ["break"]:
            raise RuntimeError("the model broke")
        return requests


def test_the_clock_holds_when_the_execution_began_and_zero_while_it_waits(tmp_path):
    model = Model({EXECUTION_CLOCKS_ENV: str(tmp_path)})
    clock = tmp_path / str(os.getpid())
    assert clock.read_bytes() == struct.pack(EXECUTION_CLOCK_FORMAT, 0.0)
    assert execution_began(clock) is None  # waiting
    before = time.monotonic()
    assert model.execute(["a"]) == ["a"]
    assert model.seen is not None and before <= model.seen <= time.monotonic()
    assert execution_began(clock) is None
    with pytest.raises(RuntimeError):
        model.execute(["break"])
    assert execution_began(clock) is None  # a failed execution ends too
    model.clock.close()
    assert not clock.exists()


def test_without_the_launchers_folder_the_clock_does_nothing(tmp_path):
    model = Model({})
    assert model.execute(["a"]) == ["a"] and model.clock.path is None
    model.clock.close()
    unwritable = Model({EXECUTION_CLOCKS_ENV: str(tmp_path / "gone")})  # the model still serves
    assert unwritable.execute(["a"]) == ["a"] and unwritable.clock.fd is None
    assert execution_began(tmp_path / "gone" / "1") is None
