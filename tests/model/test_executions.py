"""Each model instance's execution clock (iei_runtime/executions.py), which the launcher reads to
find an instance hung in one execution: what the file holds while it waits, while it executes,
after an execution that failed, and once the instance ends; and its long executions on Triton's
gauges, which the frontend's /health reads."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import fake_pb_utils
import pytest
from fake_pb_utils import install
from iei.contract import EXECUTION_CLOCK_FORMAT, EXECUTION_CLOCKS_ENV
from iei.launcher.triton_process import execution_began
from polling import wait_for

install()  # iei_runtime on sys.path

from iei_runtime.executions import (  # noqa: E402
    CORES_METRIC,
    IDLE,
    SECONDS_METRIC,
    ExecutionClock,
    Gauges,
    LongExecutions,
    clocked,
)


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


class Shown:
    """LongExecutions' gauges, as the values it last showed."""

    def __init__(self) -> None:
        self.values: list[tuple[float, float]] = []

    def __call__(self, elapsed: float, used: float) -> None:
        self.values.append((elapsed, round(used, 6)))


def watched(began: float) -> tuple[ExecutionClock, LongExecutions, Shown]:
    clock, shown = ExecutionClock({}), Shown()
    clock.began = began
    return clock, LongExecutions(clock, shown), shown


def test_an_execution_is_shown_once_it_has_run_for_seconds_with_the_cores_it_uses():
    clock, watch, shown = watched(began=100.0)
    watch.sample(101.0, cpu=10.0)
    assert shown.values == []  # short so far: the gauges are not touched
    watch.sample(102.0, cpu=11.5)
    assert shown.values == [(2.0, 1.5)]
    for t in range(103, 112):  # computing 1.5 cores, then nothing from 106 s on
        watch.sample(float(t), cpu=11.5 + 1.5 * min(t - 102, 4))
    assert shown.values[4] == (6.0, 1.5)
    assert shown.values[-2] == (10.0, 0.3)  # 105-106 s computed, in the last 5 s
    assert shown.values[-1] == (11.0, 0.0)
    clock.began = IDLE
    watch.sample(112.0, cpu=20.0)
    assert shown.values[-1] == (0.0, 0.0)
    watch.sample(113.0, cpu=20.0)
    assert len(shown.values) == 11  # shown once as over


def test_the_next_execution_starts_its_own_rate_and_a_short_one_reads_zero():
    clock, watch, shown = watched(began=100.0)
    for t in range(101, 104):
        watch.sample(float(t), cpu=2.0 * t)
    assert shown.values[-1] == (3.0, 2.0)
    clock.began = 103.5  # one ended and the next began between two samples
    watch.sample(104.0, cpu=208.0)
    assert shown.values[-1] == (0.0, 0.0)  # not the last one's values
    watch.sample(105.0, cpu=208.1)
    assert len(shown.values) == 3  # shown once as over
    watch.sample(106.0, cpu=208.2)
    assert shown.values[-1] == (2.5, 0.1)  # its own samples only


def test_the_watch_samples_in_a_thread_and_stops_with_the_clock():
    clock, shown = ExecutionClock({}), Shown()
    clock.watch = watch = LongExecutions(clock, shown)
    watch.INTERVAL = 0.01
    watch.start()
    with clock:
        clock.began -= LongExecutions.SHOWN_AFTER  # as if it began seconds ago
        wait_for(lambda: len(shown.values) >= 2, "two samples", 10)
        assert shown.values[-1][0] >= LongExecutions.SHOWN_AFTER
    wait_for(lambda: shown.values[-1] == (0.0, 0.0), "the end shown", 10)
    clock.close()
    assert not watch.thread.is_alive() and clock.watch is None


def test_a_stub_shows_them_on_tritons_gauges_by_model_and_instance():
    args = {"model_name": "iei__b_encoder", "model_instance_name": "iei__b_encoder_0_1"}
    gauges = Gauges(args)
    gauges(12.0, 1.75)
    labels = {"model": "iei__b_encoder", "instance": "iei__b_encoder_0_1"}
    assert fake_pb_utils.MetricFamily.total(SECONDS_METRIC, **labels) == 12.0
    assert fake_pb_utils.MetricFamily.total(CORES_METRIC, **labels) == 1.75
    clock = ExecutionClock({}).shown(args)
    assert clock.watch is not None and clock.watch.thread.is_alive()
    clock.close()
    assert clock.watch is None


def test_without_tritons_metrics_the_clock_still_serves(monkeypatch):
    def disabled(*args: object, **kwargs: object) -> None:
        raise RuntimeError("metrics are disabled")

    monkeypatch.setattr(fake_pb_utils.MetricFamily, "__init__", disabled)
    args = {"model_name": "iei", "model_instance_name": "iei_0_0"}
    clock = ExecutionClock({}).shown(args)
    assert clock.watch is None
    assert any("long executions not shown" in m for m in fake_pb_utils.Logger.messages)
    with clock:
        pass


def test_a_watch_that_fails_says_so_and_leaves_zeros_not_its_last_values():
    clock, shown, warned = ExecutionClock({}), Shown(), []

    def show(elapsed: float, used: float) -> None:
        shown(elapsed, used)
        if elapsed > 0:
            raise RuntimeError("Triton's metrics are gone")

    clock.watch = watch = LongExecutions(clock, show, warned.append)
    watch.INTERVAL = 0.01
    clock.began = time.monotonic() - LongExecutions.SHOWN_AFTER
    watch.start()
    watch.thread.join(timeout=10)
    assert not watch.thread.is_alive()
    assert shown.values[-1] == (0.0, 0.0)
    assert isinstance(watch.failed, RuntimeError)
    assert warned == ['long executions no longer shown: RuntimeError("Triton\'s metrics are gone")']
    clock.close()
