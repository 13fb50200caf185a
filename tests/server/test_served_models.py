"""Several models in the frontend without Triton: which Triton model a request's `model` reaches,
404s in both envelopes, /v1/models, and loading on demand shared by concurrent requests."""

from __future__ import annotations

import asyncio

import pytest
from iei.server.settings import ServerSettings
from test_app import PNG, FakeTriton, app_client, keep_numpy_inputs  # noqa: F401 (fixture)
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.anyio

MODELS = "first=x/first,dino=facebook/dinov2-small,lazy=x/lazy"


@pytest.fixture
def anyio_backend():
    return "asyncio"


class LoadingTriton(FakeTriton):
    """`iei__lazy` is not loaded until asked to load (Triton's explicit model control)."""

    def __init__(self) -> None:
        super().__init__(delay=0.0)
        self.loaded = {"iei", "iei_text", "iei__dino"}
        self.loads: list[str] = []

    async def is_model_ready(self, name):
        return name in self.loaded

    async def get_model_repository_index(self):
        return [{"name": n} for n in ("iei", "iei_text", "iei__dino", "iei__lazy")]

    async def infer(self, name, inputs, outputs=None, priority=0):
        if name not in self.loaded:  # Triton 2.51's answer for a model it has not loaded
            raise InferenceServerException(
                f"Request for unknown model: '{name}' is not found", status="400"
            )
        return await super().infer(name, inputs, outputs, priority)

    async def load_model(self, name):
        self.loads.append(name)
        await asyncio.sleep(0.05)
        self.loaded.add(name)


@pytest.mark.parametrize(
    ("model", "triton"),
    [(None, "iei"), ("first", "iei"), ("x/first", "iei"), ("dino", "iei__dino"),
     ("dinov2-small", "iei__dino")],
)  # fmt: skip
async def test_model_picks_the_triton_model(model, triton):
    fake = FakeTriton()
    async with app_client(ServerSettings(models=MODELS, triton_url="127.0.0.1:1"), fake) as client:
        body = {"inputs": [PNG]} | ({"model": model} if model else {})
        embed = await client.post("/embed", json=body)
        openai = await client.post("/v1/embeddings", json={"input": [PNG], "model": model})
    assert embed.status_code == 200 and openai.status_code == 200
    assert set(fake.models) == {triton}
    assert openai.json()["model"] == ("dino" if triton == "iei__dino" else "first")


async def test_unknown_models_are_404_in_each_routes_envelope():
    async with app_client(
        ServerSettings(models=MODELS, triton_url="127.0.0.1:1"), FakeTriton()
    ) as client:
        tei = await client.post("/embed", json={"inputs": [PNG], "model": "nope"})
        root = await client.post("/", json={"inputs": [PNG], "model": "nope"})
        openai = await client.post("/v1/embeddings", json={"input": [PNG], "model": "nope"})
        listed = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/nope")
        empty = await client.get("/v1/models/")
    assert (tei.status_code, root.status_code, openai.status_code, one.status_code) == (404,) * 4
    assert tei.json()["error_type"] == "NotFound"
    assert "served: 'first', 'dino', 'lazy'" in tei.json()["error"]
    assert openai.json()["error"]["code"] == "model_not_found"
    assert one.json()["error"]["code"] == "model_not_found"
    assert empty.status_code == 404 and empty.json()["error"]["code"] == "model_not_found"
    assert [m["id"] for m in listed["data"]] == ["first", "dino", "lazy"]


async def test_concurrent_requests_for_an_unloaded_model_share_one_load():
    fake = LoadingTriton()
    settings = ServerSettings(models=MODELS, model_idle_unload=60, triton_url="127.0.0.1:1")
    async with app_client(settings, fake) as client:
        health = await client.get("/health")  # the pinned ones answer; `lazy` need not
        body = {"inputs": [PNG], "model": "lazy"}
        answers = await asyncio.gather(*(client.post("/embed", json=body) for _ in range(5)))
        info = (await client.get("/info")).json()
    assert health.status_code == 200
    assert [a.status_code for a in answers] == [200] * 5
    assert fake.loads == ["iei__lazy"]  # once, and only what the repository has
    lazy = next(m for m in info["models"] if m["name"] == "lazy")
    assert lazy["loaded"] is True and lazy["pinned"] is False
    assert lazy["triton_models"] == {"image": "iei__lazy", "text": None}


async def test_a_model_unloaded_behind_a_workers_back_is_loaded_again_for_the_request():
    fake = LoadingTriton()
    settings = ServerSettings(models=MODELS, model_idle_unload=60, triton_url="127.0.0.1:1")
    body = {"inputs": [PNG], "model": "lazy"}
    async with app_client(settings, fake) as client:
        first = await client.post("/embed", json=body)
        fake.loaded.discard("iei__lazy")  # `iei serve` unloaded it (this worker used it lately)
        second = await client.post("/embed", json=body)
    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert fake.loads == ["iei__lazy", "iei__lazy"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/embeddings", {"input": [PNG], "model": "lazy", "dimensions": 1}),
        ("/v2/embed", {"images": [f"data:image/png;base64,{PNG}"], "model": "lazy",
                       "output_dimension": 1}),
        ("/embed", {"inputs": [PNG], "model": "lazy", "dimensions": 1}),
    ],
)  # fmt: skip
async def test_dimensions_for_a_model_not_loaded_yet_load_it_to_check_them(path, body):
    """The check of `dimensions` against the model's asks the model: it was a 503 'unknown
    model', and the model was never loaded."""
    fake = LoadingTriton()
    settings = ServerSettings(models=MODELS, model_idle_unload=60, triton_url="127.0.0.1:1")
    async with app_client(settings, fake) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert fake.loads == ["iei__lazy"]
