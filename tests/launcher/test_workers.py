"""IEI_WORKERS: the frontend's uvicorn workers, `auto` from the host (GPUs and usable cores) or
a count, checked by name before anything starts."""

from __future__ import annotations

import pytest
from iei.launcher import frontend as frontend_module
from iei.launcher.frontend import Frontend, auto_workers, frontend_workers, uvicorn_arguments
from iei.launcher.settings import LauncherSettings
from pydantic import ValidationError


@pytest.mark.parametrize(
    ("cores", "gpus", "workers"),
    [
        (2, 0, 2), (64, 0, 2),  # the model's forward pass is the bound: more would only idle
        (2, 1, 2), (6, 1, 3), (16, 1, 8), (32, 2, 16), (192, 8, 16),  # a worker per 2 cores
    ],
)  # fmt: skip
def test_auto_is_two_without_a_gpu_and_a_worker_per_two_cores_with_one(cores, gpus, workers):
    assert auto_workers(cores, gpus) == workers


def test_the_launcher_counts_the_host_it_runs_on(monkeypatch, tmp_path):
    monkeypatch.setattr(frontend_module, "gpu_count", lambda: 1)
    monkeypatch.setattr(frontend_module, "available_cores", lambda _: 16)  # any repository
    assert frontend_workers(LauncherSettings()) == (8, "auto: 1 GPU(s), 16 cores")
    assert frontend_workers(LauncherSettings(workers="3")) == (3, "IEI_WORKERS")
    monkeypatch.setattr(frontend_module, "gpu_count", lambda: 0)
    assert frontend_workers(LauncherSettings(workers="auto")) == (2, "auto: no GPU")
    # and uvicorn is started with the count, never the word
    monkeypatch.setattr(frontend_module, "gpu_count", lambda: 1)
    chosen = Frontend(LauncherSettings(), "127.0.0.1:1", tmp_path)
    assert chosen.workers == 8
    assert uvicorn_arguments("::", 8000, chosen.workers)[6:8] == ["--workers", "8"]


@pytest.mark.parametrize("value", ["0", "65", "-1", "two", "2.5", "auto2"])
def test_a_worker_count_out_of_range_or_not_a_count_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv("IEI_WORKERS", value)
    with pytest.raises(ValidationError, match="IEI_WORKERS"):
        LauncherSettings()


def test_auto_and_a_count_are_read_in_any_case_and_spacing_and_empty_is_auto(monkeypatch):
    monkeypatch.setenv("IEI_WORKERS", " AUTO ")
    assert LauncherSettings().workers == "auto"
    monkeypatch.setenv("IEI_WORKERS", " 64 ")
    assert LauncherSettings().workers == "64"
    monkeypatch.setenv("IEI_WORKERS", "")  # empty means the default, as for every setting
    assert LauncherSettings().workers == "auto"
    assert LauncherSettings(workers=4).workers == "4"  # code may pass a number
