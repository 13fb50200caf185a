"""Loading a model on demand (IEI_MODEL_IDLE_UNLOAD), against a stand-in of Triton's repository
API: what is loaded, when Triton is asked again, a load that fails or outlasts a request, and a
load another worker started."""

from __future__ import annotations

import asyncio

import pytest
from iei.server import served
from iei.server.errors import ApiError, ErrorType
from iei.server.served import ServedModels
from iei.server.settings import ServerSettings

pytestmark = pytest.mark.anyio

MODELS = "main=google/vit-base-patch16-224,lazy=openai/clip-vit-base-patch32"


class FakeTriton:
    """The repository index (name -> [state, reason]) and its load calls. `loading` makes a
    load call take that many polls before the model turns READY; `fail` names a model whose
    load fails; `timeout` makes the load call outlast the request."""

    endpoint = "127.0.0.1:1"

    def __init__(self, index: dict[str, list[str]]) -> None:
        self.index = index
        self.forgotten = 0
        self.loads: list[str] = []
        self.fail: set[str] = set()
        self.timeout = False
        self.loading: dict[str, int] = {}  # name -> index looks until READY

    async def repository_index(self) -> dict[str, tuple[str, str]]:
        for name, left in list(self.loading.items()):
            if left <= 0:
                self.index[name] = ["READY", ""]
                del self.loading[name]
            else:
                self.loading[name] = left - 1
        return {name: (state, reason) for name, (state, reason) in self.index.items()}

    async def repository_models(self) -> dict[str, str]:
        return {name: state for name, (state, _) in (await self.repository_index()).items()}

    async def load_model(self, name: str) -> None:
        self.loads.append(name)
        await asyncio.sleep(0)
        if name in self.fail:
            self.index[name] = ["UNAVAILABLE", "no config.json"]
            raise ApiError(ErrorType.UNHEALTHY, f"model {name} failed to load: no config.json")
        if self.timeout:
            self.index[name] = ["LOADING", ""]
            self.loading[name] = 3
            raise ApiError(ErrorType.TIMEOUT, f"model {name} is still loading")
        self.index[name] = ["READY", ""]


def models(triton: FakeTriton) -> tuple[ServedModels, object]:
    chosen = ServedModels(ServerSettings(models=MODELS, model_idle_unload=60), triton)  # type: ignore[arg-type]
    return chosen, chosen.resolve("lazy")


@pytest.fixture(autouse=True)
def quick(monkeypatch, tmp_path):
    monkeypatch.setattr(served, "LOAD_POLL", 0.001)
    monkeypatch.setattr(served.tempfile, "gettempdir", lambda: str(tmp_path))


def unloaded() -> dict[str, list[str]]:
    return {"iei": ["READY", ""], "iei_text": ["READY", ""], "iei__lazy": ["UNAVAILABLE", ""],
            "iei__lazy_text": ["UNAVAILABLE", ""]}  # fmt: skip


async def test_a_dual_encoder_loads_its_image_and_text_models_once_for_concurrent_requests():
    triton = FakeTriton(unloaded())
    chosen, lazy = models(triton)
    await asyncio.gather(*(chosen.ensure_loaded(lazy) for _ in range(5)))
    assert triton.loads == ["iei__lazy", "iei__lazy_text"]
    await chosen.ensure_loaded(lazy)  # used lately: Triton is not asked
    assert triton.loads == ["iei__lazy", "iei__lazy_text"]


async def test_a_text_model_that_is_not_loaded_is_loaded_though_the_image_model_is():
    """A dual encoder whose text model failed to load kept answering texts 503: only the image
    model's readiness was looked at."""
    triton = FakeTriton({**unloaded(), "iei__lazy": ["READY", ""]})
    chosen, lazy = models(triton)
    await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy_text"]


async def test_after_triton_went_away_a_model_used_lately_is_looked_at_again():
    """A restarted Triton has unloaded every on-demand model: a worker that used one a moment
    before answered 503 until its own idea of 'lately' ran out."""
    triton = FakeTriton(unloaded())
    chosen, lazy = models(triton)
    await chosen.ensure_loaded(lazy)
    triton.index = unloaded()  # Triton restarted
    triton.forgotten += 1  # what the client does when it finds Triton gone (forget_facts)
    await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy", "iei__lazy_text"] * 2


async def test_a_failed_load_is_not_tried_again_for_a_while_and_says_why():
    """A broken checkpoint was loaded again by every request of every worker."""
    triton = FakeTriton(unloaded())
    triton.fail = {"iei__lazy"}
    chosen, lazy = models(triton)
    with pytest.raises(ApiError, match=r"failed to load: no config\.json"):
        await chosen.ensure_loaded(lazy)
    with pytest.raises(
        ApiError, match=r"failed to load \(.*no config.json\); it is tried again in 5 s"
    ) as refused:
        await chosen.ensure_loaded(lazy)
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "5"}
    assert triton.loads == ["iei__lazy"]
    chosen._failed["lazy"] = served.FailedLoad(0.0, 5.0, "no config.json")  # the wait is over
    triton.fail = set()
    await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy", "iei__lazy", "iei__lazy_text"]
    assert "lazy" not in chosen._failed


async def test_a_load_that_outlasts_the_request_timeout_is_waited_for_not_loaded_again():
    """The load call's timeout (IEI_REQUEST_TIMEOUT) was taken for a failure; the next request
    loaded the model a second time while Triton still loaded the first."""
    triton = FakeTriton(unloaded())
    triton.timeout = True
    chosen, lazy = models(triton)
    await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy", "iei__lazy_text"]
    assert triton.index["iei__lazy"][0] == triton.index["iei__lazy_text"][0] == "READY"


async def test_a_model_another_worker_is_loading_is_waited_for():
    triton = FakeTriton({**unloaded(), "iei__lazy": ["LOADING", ""]})
    triton.loading["iei__lazy"] = 3
    chosen, lazy = models(triton)
    await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy_text"]  # not the one in progress


async def test_a_load_that_fails_in_another_worker_is_this_one_s_failure_too():
    triton = FakeTriton({**unloaded(), "iei__lazy": ["LOADING", ""]})
    chosen, lazy = models(triton)

    async def fails_later() -> None:
        await asyncio.sleep(0.01)
        triton.index["iei__lazy"] = ["UNAVAILABLE", "CUDA out of memory"]

    with pytest.raises(ApiError, match="iei__lazy failed to load: CUDA out of memory"):
        await asyncio.gather(chosen.ensure_loaded(lazy), fails_later())
    assert triton.loads == []


async def test_workers_of_one_host_load_a_model_one_at_a_time(tmp_path):
    """Two workers (processes) asking at once both loaded it: Triton 2.51 loads a model twice
    when asked twice at once. The second waits for the first's lock, then finds it loaded."""
    triton = FakeTriton(unloaded())
    first, lazy = models(triton)
    second, _ = models(triton)
    await asyncio.gather(first.ensure_loaded(lazy), second.ensure_loaded(lazy))
    assert triton.loads == ["iei__lazy", "iei__lazy_text"]
