"""Loading a model on demand (IEI_MODEL_IDLE_UNLOAD), against a stand-in of Triton's repository
API: what is loaded, when Triton is asked again, a load that fails or outlasts a request, and a
load another worker started."""

from __future__ import annotations

import asyncio
import re
import time

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
        self.unloads: list[str] = []
        self.unloading: dict[str, int] = {}  # name -> index looks until it is gone
        self.unload_fails = False
        self.gone_before_loads: set[str] = set()  # models that must be gone before any load
        self.last: dict[str, float] = {}  # name -> its last inference (Unix seconds)
        self.probed: list[str] = []

    async def repository_index(self) -> dict[str, tuple[str, str]]:
        for name, left in list(self.unloading.items()):
            if left <= 0:
                self.index[name] = ["UNAVAILABLE", "unloaded"]
                del self.unloading[name]
            else:
                self.unloading[name] = left - 1
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
        for other in self.gone_before_loads:
            assert self.index[other][0] == "UNAVAILABLE", f"{name} loaded while {other} unloads"
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

    async def unload_model(self, name: str) -> None:
        """Answered at once; the model is UNLOADING for a few looks (its requests finish)."""
        if self.unload_fails:
            raise ApiError(ErrorType.UNHEALTHY, "the inference server is unreachable (OSError)")
        self.unloads.append(name)
        self.index[name] = ["UNLOADING", ""]
        self.unloading[name] = 2

    async def last_inference(self, names: list[str]) -> float | None:
        return max(self.last.get(name, 0.0) for name in names)

    async def model_answers(self, name: str) -> bool:
        self.probed.append(name)
        self.last[name] = time.time()
        return True


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


async def test_a_failed_ensemble_load_unloads_the_steps_it_loaded():
    """A split-layout model whose ensemble failed to load kept its READY steps (their memory and
    processes) until Triton restarted."""
    triton = FakeTriton({"iei": ["READY", ""], "iei__lazy": ["UNAVAILABLE", ""],
                         "iei__lazy_preprocess": ["UNAVAILABLE", ""],
                         "iei__lazy_encoder": ["UNAVAILABLE", ""]})  # fmt: skip
    triton.fail = {"iei__lazy"}
    chosen, lazy = models(triton)
    with pytest.raises(ApiError, match="iei__lazy failed to load"):
        await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy_preprocess", "iei__lazy_encoder", "iei__lazy"]
    assert triton.unloads == ["iei__lazy_encoder", "iei__lazy_preprocess"]


CAPPED = "main=google/vit-base-patch16-224,lazy=google/vit-base-patch16-224,a=x/a,b=x/b"


def capped(triton: FakeTriton, cap: int) -> ServedModels:
    settings = ServerSettings(models=CAPPED, model_idle_unload=60, max_loaded_models=cap)
    return ServedModels(settings, triton)  # type: ignore[arg-type]


def loaded_models(**states: str) -> dict[str, list[str]]:
    """The repository of CAPPED: `main` READY, the others UNAVAILABLE unless given."""
    index = {"iei": ["READY", ""]}
    for name in ("lazy", "a", "b"):
        index[f"iei__{name}"] = [states.get(name, "UNAVAILABLE"), ""]
    return index


async def test_past_the_cap_the_least_recently_used_model_is_unloaded_first():
    triton = FakeTriton(loaded_models(a="READY", b="READY"))
    triton.last = {"iei__a": time.time() - 70, "iei__b": time.time() - 90}
    triton.gone_before_loads = {"iei__b"}  # an unloading model holds its memory: waited for
    chosen = capped(triton, 3)
    await chosen.ensure_loaded(chosen.resolve("lazy"))
    assert triton.unloads == ["iei__b"]  # a was used more lately
    assert triton.loads == ["iei__lazy"]
    # It ran an inference at once: counted as in use before its request reaches Triton, so
    # that another worker making room does not take it.
    assert triton.probed == ["iei__lazy"]
    assert triton.index["iei__b"][0] == "UNAVAILABLE" and triton.index["iei__a"][0] == "READY"


async def test_within_the_cap_nothing_is_unloaded():
    triton = FakeTriton(loaded_models(a="READY"))
    chosen = capped(triton, 3)
    await chosen.ensure_loaded(chosen.resolve("lazy"))
    assert (triton.unloads, triton.loads) == ([], ["iei__lazy"])


async def test_past_the_cap_with_every_model_in_use_a_load_is_a_503_to_retry_not_a_failure():
    """In use: an inference within IEI_REQUEST_TIMEOUT (60 s here), the longest a request that
    used the model may still run (its next chunk would find the model gone)."""
    triton = FakeTriton(loaded_models(a="READY", b="LOADING"))  # a load in progress counts
    triton.last = {"iei__a": time.time() - 20}
    chosen = capped(triton, 3)
    lazy = chosen.resolve("lazy")
    with pytest.raises(ApiError, match=r"'lazy' cannot load now: IEI_MAX_LOADED_MODELS=3 models "
                       r"are loaded \('main', 'a', 'b'\) and in use") as refused:  # fmt: skip
        await chosen.ensure_loaded(lazy)
    # until `a` has been idle for the request timeout
    assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "40"}
    assert (triton.unloads, triton.loads) == ([], [])
    # no back-off: once `a` has been idle long enough, the next request loads it at once
    triton.last["iei__a"] = time.time() - 61
    await chosen.ensure_loaded(lazy)
    assert (triton.unloads, triton.loads) == (["iei__a"], ["iei__lazy"])


async def test_an_unload_triton_fails_is_a_503_to_retry_not_a_failed_load():
    triton = FakeTriton(loaded_models(a="READY"))
    triton.unload_fails = True
    chosen = capped(triton, 2)
    lazy = chosen.resolve("lazy")
    with pytest.raises(ApiError, match="'lazy' cannot load now: the inference server is unre"):
        await chosen.ensure_loaded(lazy)
    assert triton.loads == [] and "lazy" not in chosen._failed
    triton.unload_fails = False
    await chosen.ensure_loaded(lazy)
    assert triton.loads == ["iei__lazy"]


async def test_an_evicted_models_split_layout_unloads_its_ensemble_before_its_steps():
    triton = FakeTriton({**loaded_models(),
                         **{f"iei__a{step}": ["READY", ""] for step in ("", "_preprocess",
                                                                         "_encoder")}})  # fmt: skip
    chosen = capped(triton, 2)
    evictions = served.metrics.MODEL_EVICTIONS.labels("a")
    before = evictions._value.get()
    await chosen.ensure_loaded(chosen.resolve("lazy"))
    assert triton.unloads == ["iei__a", "iei__a_encoder", "iei__a_preprocess"]
    assert evictions._value.get() == before + 1


@pytest.mark.parametrize(
    ("models", "idle", "cap", "message"),
    [
        (CAPPED, 60, 1, "IEI_MAX_LOADED_MODELS=1 leaves no room for a model loaded on demand: 1 "
         "of IEI_MODELS are always loaded (pinned)"),
        (CAPPED + "?pinned=true", 60, 1, "IEI_MAX_LOADED_MODELS=1, but 2 models of IEI_MODELS "
         "are always loaded (pinned)"),
        (CAPPED, None, 3, "IEI_MAX_LOADED_MODELS=3, but 4 models of IEI_MODELS are always loaded "
         "(IEI_MODEL_IDLE_UNLOAD is unset)"),
    ],
)  # fmt: skip
def test_a_cap_the_always_loaded_models_fill_is_refused(models, idle, cap, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ServerSettings(models=models, model_idle_unload=idle, max_loaded_models=cap)


def test_a_cap_that_leaves_room_is_taken():
    ServerSettings(models=CAPPED, model_idle_unload=60, max_loaded_models=2)
    ServerSettings(models=CAPPED, max_loaded_models=4)
    ServerSettings(max_loaded_models=1)  # one model


async def test_a_model_unloading_already_is_waited_for_not_a_503():
    """The idle unloading (or another worker) is unloading `b`: its room comes once it is gone,
    and `a`, in use, stays."""
    triton = FakeTriton(loaded_models(a="READY", b="UNLOADING"))
    triton.unloading["iei__b"] = 3
    triton.last = {"iei__a": time.time() - 1}
    triton.gone_before_loads = {"iei__b"}
    chosen = capped(triton, 3)
    await chosen.ensure_loaded(chosen.resolve("lazy"))
    assert (triton.unloads, triton.loads) == ([], ["iei__lazy"])


async def test_a_request_of_this_host_marks_its_model_in_use_before_triton_sees_it():
    """Triton stamps `last_inference` once a batch ends: a request that fetched its URLs first
    found its model unloaded for another. Its start counts on this host."""
    triton = FakeTriton(loaded_models(a="READY"))
    triton.last = {"iei__a": time.time() - 600}  # long idle, as Triton sees it
    first, second = capped(triton, 2), capped(triton, 2)  # two workers of one host
    await first.ensure_loaded(first.resolve("a"))  # a request for `a` starts (loaded already)
    with pytest.raises(ApiError, match="cannot load now") as refused:
        await second.ensure_loaded(second.resolve("lazy"))
    assert 55 <= int(refused.value.headers["Retry-After"]) <= 60
    assert triton.unloads == []


async def test_a_load_that_waited_its_request_timeout_for_another_is_a_503(monkeypatch):
    triton = FakeTriton(loaded_models())
    chosen = capped(triton, 3)
    chosen.in_use = 0.05
    async with served.host_lock(f"{triton.endpoint}/loaded-models"):  # another load, under way
        with pytest.raises(ApiError, match=r"another load on this host has taken 0\.05 s"):
            await chosen.ensure_loaded(chosen.resolve("lazy"))
    assert triton.loads == [] and "lazy" not in chosen._failed
