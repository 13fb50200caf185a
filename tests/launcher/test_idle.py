"""`iei serve`'s unloading (launcher/idle.py) against a stand-in of Triton's repository and
statistics API: idle models go, pinned ones stay, and IEI_MAX_LOADED_MODELS is kept when
frontends on several hosts made room at once."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from iei.launcher.idle import IdleUnloader
from iei.launcher.repository import ModelPlan
from iei.models import parse_models

MODELS = "main=x/main,a=x/a,b=x/b,c=x/c?pinned=true"


class Triton:
    """The stand-in Triton: its index, each model's last inference (Unix seconds), the unload
    calls; the launcher's TritonServer as the unloader sees it (plans, stub watch)."""

    def __init__(self, ready: set[str], last: dict[str, float]) -> None:
        self.plans = tuple(ModelPlan(model) for model in parse_models(MODELS))
        self.ready, self.last = set(ready), last
        self.unloads: list[str] = []
        self.forgotten: list[str] = []

    def watch_stubs(self, ready: set[str]) -> None:
        pass

    def forget_stubs(self, names: list[str]) -> None:
        self.forgotten += names

    def client(self) -> httpx.Client:
        def answer(request: httpx.Request) -> httpx.Response:
            path = request.url.path
            if path == "/v2/repository/index":
                index = [{"name": n, "state": "READY"} for n in sorted(self.ready)]
                return httpx.Response(200, content=json.dumps(index))
            name = path.split("/")[-2]
            if path.endswith("/unload"):
                self.unloads.append(name)
                self.ready.discard(name)
                return httpx.Response(200, content=b"{}")
            stats = [{"name": name, "last_inference": int(self.last.get(name, 0) * 1000)}]
            return httpx.Response(200, content=json.dumps({"model_stats": stats}))

        return httpx.Client(base_url="http://triton", transport=httpx.MockTransport(answer))


EVERY = {"iei", "iei__a", "iei__b", "iei__c"}


def check(triton: Triton, *, idle: float = 60.0, cap: int | None = None) -> None:
    unloader = IdleUnloader(triton, idle, max_loaded=cap)  # type: ignore[arg-type]
    # the models were seen loaded long ago (their load is not a use)
    unloader.ready_since = {name: 0.0 for name in ("a", "b")}
    with triton.client() as client:
        unloader._check(client)


def test_an_idle_model_is_unloaded_and_a_pinned_one_stays():
    now = time.time()
    triton = Triton(EVERY, {"iei__a": now - 120, "iei__b": now - 1})
    check(triton)
    assert triton.unloads == ["iei__a"] and triton.forgotten == ["iei__a"]


@pytest.mark.parametrize(
    ("cap", "unloaded"),
    [
        (4, []),  # within the cap
        (3, ["iei__b"]),  # one past it: the least recently used of those loaded on demand
        (2, ["iei__b", "iei__a"]),  # the pinned ones (main, c) are never unloaded
    ],
)
def test_models_past_the_cap_that_are_not_in_use_are_unloaded_least_recent_first(cap, unloaded):
    now = time.time()
    triton = Triton(EVERY, {"iei__a": now - 30, "iei__b": now - 40, "iei": now - 500})
    check(triton, cap=cap)
    assert triton.unloads == unloaded


def test_a_model_in_use_is_not_unloaded_past_the_cap():
    """Two frontends on two hosts made room at once: the cap is kept once one is not in use."""
    now = time.time()
    triton = Triton(EVERY, {"iei__a": now - 1, "iei__b": now - 2})
    check(triton, cap=3)
    assert triton.unloads == []
