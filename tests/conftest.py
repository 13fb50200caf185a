"""Shared fixtures: tiny models of every family, sample images, and the running stack."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from stack import Stack
from tiny_models import build_tiny_model

# Seconds the test process may take to exit once the session is over. A CI run once printed its
# summary and then hung (a process it had started, or a thread, held its exit): 90 minutes of CI
# for nothing, and no clue. Past this, every thread's traceback goes to stderr and the process
# exits with status 1 (faulthandler): a red run that says what held it.
EXIT_WATCHDOG = 120


def pytest_unconfigure(config: pytest.Config) -> None:
    # The hang, caught by this watchdog (stop 32): multiprocessing's exit joins a child that some
    # test (or a library under it) started and left running. Each such child is named here, with
    # what it runs, and ended, so the run ends and says what leaked.
    for child in multiprocessing.active_children():
        started_by = getattr(child, "started_by", "(unknown)")
        sys.stderr.write(
            f"conftest: a multiprocessing child was left running: {child.name} (pid "
            f"{child.pid}); ending it. It was started by:\n{started_by}\n"
        )
        child.kill()
        child.join(10)
    faulthandler.dump_traceback_later(EXIT_WATCHDOG, exit=True)


def _remembering_who_starts(start: Any) -> Any:
    """multiprocessing's Process.start, noting the stack that called it (for the leak above)."""

    def started(self: Any) -> None:
        self.started_by = "".join(traceback.format_stack(limit=12)[:-1])
        start(self)

    return started


multiprocessing.process.BaseProcess.start = _remembering_who_starts(  # type: ignore[method-assign]
    multiprocessing.process.BaseProcess.start
)


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Exported models go to a folder of this session (every stack started here inherits it),
    not to the user's cache."""
    folder = tmp_path_factory.mktemp("engine-cache")
    previous = os.environ.get("IEI_ENGINE_CACHE")
    os.environ["IEI_ENGINE_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("IEI_ENGINE_CACHE", None)
    else:
        os.environ["IEI_ENGINE_CACHE"] = previous


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> folder of a tiny random model, built on first use."""
    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    class Folders(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> Path:
            built[family] = build_tiny_model(family, root / family)
            self[family] = built[family]
            return built[family]

    return Folders()


@pytest.fixture(scope="session")
def vit_stack(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack with the tiny ViT, shared by the tests that don't care about the family."""
    log = tmp_path_factory.mktemp("logs") / "vit_stack.log"
    stack = Stack(model_dirs["vit"], log).start()
    yield stack
    assert stack.stop() == 0, stack.log()


@pytest.fixture(scope="session")
def clip_stack(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack with the tiny CLIP (images and texts), shared by the retrieval tests, the demo
    page and the text-search example. Its files go to Triton in the HTTP body (no shared memory
    region): the path of a Triton in another container, tested against the real one."""
    log = tmp_path_factory.mktemp("logs") / "clip_stack.log"
    stack = Stack(model_dirs["clip"], log, IEI_TRITON_SHM_MB="0").start()
    yield stack
    assert stack.stop() == 0, stack.log()


# The served names of `models_stack`: a dual encoder (the default), an image-only model pinned in
# memory, and a model loaded on demand and unloaded after MODELS_IDLE_UNLOAD seconds.
MODELS = {"siglip": "siglip", "dino": "dinov2", "vit": "vit"}
MODELS_IDLE_UNLOAD = 8


@pytest.fixture(scope="session")
def models_stack(
    model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One stack serving three models at once (IEI_MODELS), shared by the tests of several
    models."""
    log = tmp_path_factory.mktemp("logs") / "models_stack.log"
    items = {name: str(model_dirs[family]) for name, family in MODELS.items()}
    items["dino"] += "?pinned=true"
    stack = Stack(None, log, models=items, IEI_MODEL_IDLE_UNLOAD=str(MODELS_IDLE_UNLOAD)).start()
    yield stack
    assert stack.stop() == 0, stack.log()
