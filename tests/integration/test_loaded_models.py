"""IEI_MAX_LOADED_MODELS through the real stack: three models of one tiny ViT, the default pinned,
at most two loaded at once. Loading a third unloads the one least recently used, unless it is in
use (a 503 to retry); and a model unloaded through Triton's own API is no crash."""

from __future__ import annotations

import base64
import contextlib
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from iei.launcher.triton_process import execution_began
from polling import wait_for
from reference import Reference, cosine_rows
from sample_images import photos
from stack import Stack, descendants

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def capped_stack(model_dirs, tmp_path_factory):
    vit = str(model_dirs["vit"])
    log = tmp_path_factory.mktemp("logs") / "capped_stack.log"
    stack = Stack(
        None, log, models={"main": vit, "a": vit, "b": vit},
        IEI_MODEL_IDLE_UNLOAD="600", IEI_MAX_LOADED_MODELS="2",
        IEI_REQUEST_TIMEOUT="10",  # a model is in use for 10 s after its last inference
    ).start()  # fmt: skip
    yield stack
    assert stack.stop() == 0, stack.log()


def embed(stack: Stack, model: str, files: list[bytes]) -> httpx.Response:
    body = {"inputs": [base64.b64encode(f).decode() for f in files], "model": model}
    return httpx.post(f"{stack.url}/embed", json=body, timeout=120)


def still_loading(answer: httpx.Response) -> bool:
    """The 504 of a load that outlasts the request (IEI_REQUEST_TIMEOUT, 10 s here: a tiny ViT
    took 10.1 s to load on a busy 2-core host), which a client retries after its Retry-After."""
    return (
        answer.status_code == 504
        and "Retry-After" in answer.headers
        and "it goes on loading" in answer.json()["error"]
    )


def embed_once_loaded(stack: Stack, model: str, files: list[bytes]) -> httpx.Response:
    """`embed`, sent again while its model goes on loading (as IEIClient does)."""
    answers: list[httpx.Response] = []

    def answered() -> bool:
        answers.append(embed(stack, model, files))
        return not still_loading(answers[-1])

    wait_for(answered, f"{model} loaded", 120, every=1.0, log=stack.log)
    return answers[-1]


def loaded(stack: Stack) -> dict[str, bool]:
    models = httpx.get(f"{stack.url}/info", timeout=30).json()["models"]
    return {m["name"]: m["loaded"] for m in models}


def test_past_the_cap_the_model_used_least_lately_makes_room_once_it_is_not_in_use(
    capped_stack, model_dirs
):
    files = list(photos().values())[:2]
    assert embed_once_loaded(capped_stack, "a", files).status_code == 200
    assert loaded(capped_stack) == {"main": True, "a": True, "b": False}

    refused = embed(capped_stack, "b", files)  # `a` answered a moment ago: in use
    assert refused.status_code == 503, refused.text
    assert 1 <= int(refused.headers["Retry-After"]) <= 10  # until `a` is idle
    assert (
        "IEI_MAX_LOADED_MODELS=2 models are loaded ('main', 'a') and in use"
        in (refused.json()["error"])
    )

    answers: list[httpx.Response] = []
    wait_for(lambda: answers.append(embed(capped_stack, "b", files)) or answers[-1].status_code
             == 200, "b loaded once a was idle", 60, every=1.0, log=capped_stack.log)  # fmt: skip
    assert all(a.status_code in (200, 503) or still_loading(a) for a in answers), [
        (a.status_code, a.text) for a in answers
    ]
    expected = Reference(model_dirs["vit"]).embed(files)
    got = np.asarray(answers[-1].json(), dtype=np.float64)
    assert cosine_rows(got, expected).min() > 0.999
    assert loaded(capped_stack) == {"main": True, "a": False, "b": True}
    log = capped_stack.log()
    assert (
        "unloading model 'a' (Triton models iei__a) to load 'b' within IEI_MAX_LOADED_MODELS=2"
        in log
    )
    assert capped_stack.metric('iei_model_evictions_total{model="a"}') == 1
    assert capped_stack.metric('iei_model_loads_total{model="b",outcome="failed"}') == 0
    assert "restarting Triton" not in log  # the stub watch took no unloaded stub for a crash
    assert httpx.get(f"{capped_stack.url}/health").status_code == 200


def stubs_of(stack: Stack, model: str) -> set[int]:
    """The pids of `model`'s Python stubs (instances) under `iei serve`."""
    fragment = f"/{model}/1/model.py".encode()
    found = set()
    for pid in descendants(stack.process.pid):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"triton_python_backend_stub" in command and fragment in command:
                found.add(pid)
    return found


def watched(stack: Stack) -> set[int]:
    """The stubs the launcher watches, as its last "watching the model stubs" line says."""
    lines = re.findall(r"watching the model stubs \(pids ([\d, ]+)\)", stack.log())
    return {int(pid) for pid in lines[-1].split(", ")} if lines else set()


def execution_clocks(stack: Stack) -> Path:
    """The folder of the instances' execution clocks (the launcher's hang check): in the
    launcher's work folder, which its log names through Triton's log beside it."""
    log = re.search(r"started Triton \(pid \d+\), log: (\S+)-triton\.log", stack.log())
    assert log, stack.log()
    return Path(log.group(1)) / "executions"


def test_a_model_unloaded_through_tritons_own_api_is_no_crash(capped_stack):
    """Clients may call Triton directly, its model control API included. The launcher restarted
    Triton when the stubs of a model it had not unloaded itself exited."""
    files = list(photos().values())[:1]
    if not loaded(capped_stack)["b"]:
        wait_for(lambda: embed(capped_stack, "b", files).status_code == 200, "b loaded", 30, 1.0)
    stubs = stubs_of(capped_stack, "iei__b")
    assert stubs
    # the launcher's idle check watches them once it has seen b loaded
    wait_for(lambda: stubs <= watched(capped_stack), "b's stubs watched", 20,
             log=capped_stack.log)  # fmt: skip
    clocks = execution_clocks(capped_stack)
    assert {int(f.name) for f in clocks.iterdir()} >= stubs  # each instance keeps its clock
    assert all(execution_began(clocks / str(pid)) is None for pid in stubs)  # waiting
    triton = f"http://{capped_stack.triton_http}"
    assert httpx.post(f"{triton}/v2/repository/models/iei__b/unload", timeout=60).status_code == 200
    wait_for(lambda: not stubs_of(capped_stack, "iei__b"), "b's stubs exited", 30)
    wait_for(lambda: not stubs & watched(capped_stack)
             or "model iei__b was unloaded" in capped_stack.log(),
             "the launcher saw b's stubs exit", 20, log=capped_stack.log)  # fmt: skip
    assert "restarting Triton" not in capped_stack.log()
    assert loaded(capped_stack)["b"] is False
    assert not {int(f.name) for f in clocks.iterdir()} & stubs  # gone with their instances
    assert embed(capped_stack, "main", files).status_code == 200
