"""Engines: which one `auto` picks and what is refused, the same vectors from every engine for
every family (float32 within cosine 0.9999 of torch, int8 within 0.99), and the export cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from fake_pb_utils import install
from sample_images import photos
from tiny_models import JOINT_FAMILIES, ORIGINAL_FAMILIES, RETRIEVAL_FAMILIES

install()
from iei_runtime import engines, loading  # noqa: E402
from iei_runtime.settings import engine_cache, read_settings  # noqa: E402

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
FILES = list(photos().values())
TEXTS = ["a photo of a cat", "a red car at night on a wet street", "the sea"]
EXPORTED = [("onnxruntime", "float32"), ("openvino", "float32"), ("onnxruntime", "int8")]


def minimum_for(precision: str) -> float:
    return 0.99 if precision == "int8" else 0.9999


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


def settings_for(folder, cache, engine="torch", dtype="float32"):
    environ = {"IMAGE_EMBEDDING_MODEL": str(folder), "IEI_ENGINE": engine, "IEI_DTYPE": dtype,
               "IEI_ENGINE_CACHE": str(cache)}  # fmt: skip
    return read_settings({}, environ)


# --- choices ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "dtype", "device", "native_bf16", "chosen"),
    [
        ("auto", "auto", CPU, True, ("torch", "bfloat16")),  # native bf16: torch's own
        ("auto", "auto", CPU, False, ("openvino", "float32")),  # the fastest exact engine
        ("auto", "int8", CPU, True, ("onnxruntime", "int8")),  # int8 only when asked for
        ("auto", "auto", GPU, False, ("torch", "float16")),  # a GPU keeps torch
        ("auto", "float32", CPU, True, ("openvino", "float32")),
        ("onnxruntime", "float32", CPU, True, ("onnxruntime", "float32")),
        ("openvino", "bfloat16", CPU, True, ("openvino", "bfloat16")),
        ("torch", "auto", CPU, False, ("torch", "float32")),
    ],
)
def test_auto_picks_the_fastest_exact_path_and_int8_only_when_asked(
    engine, dtype, device, native_bf16, chosen
):
    assert engines.choose(engine, dtype, device, native_bf16) == engines.Choice(*chosen)


@pytest.mark.parametrize(
    ("engine", "dtype", "device", "message"),
    [
        ("onnxruntime", "bfloat16", CPU, "no bfloat16 kernels"),
        ("onnxruntime", "float16", CPU, "no float16 kernels"),
        ("openvino", "float16", CPU, "use bfloat16 or float32"),
        ("torch", "int8", CPU, "int8 runs on onnxruntime"),
        ("openvino", "int8", CPU, "int8 runs on onnxruntime"),
        ("onnxruntime", "float32", GPU, "on a GPU IEI runs torch"),
        ("auto", "int8", GPU, "on a GPU IEI runs torch"),
        ("tensorrt", "float32", CPU, "IEI_ENGINE='tensorrt'"),
    ],
)
def test_what_cannot_run_is_refused_in_one_line(engine, dtype, device, message):
    with pytest.raises(engines.EngineError, match=message) as refused:
        engines.choose(engine, dtype, device, native_bf16=True)
    assert "\n" not in str(refused.value)


def test_a_refused_choice_stops_loading_with_the_models_one_line(model_dirs, cache):
    settings = settings_for(model_dirs["vit"], cache, "onnxruntime", "bfloat16")
    with pytest.raises(loading.ModelLoadError, match=r"IEI cannot load model .*bfloat16 kernels"):
        loading.load_embedder(settings, CPU, 1)


def test_an_engine_that_is_not_installed_is_refused(monkeypatch):
    monkeypatch.setattr(engines, "installed", lambda engine: engine == "torch")
    with pytest.raises(engines.EngineError, match="openvino is not installed"):
        engines.choose("openvino", "float32", CPU, native_bf16=False)
    # auto falls back on what is there
    assert engines.choose("auto", "float32", CPU, False) == engines.Choice("torch", "float32")


def test_the_cache_is_beside_the_hugging_face_cache_unless_set(tmp_path):
    assert engine_cache(str(tmp_path), {}) == tmp_path
    assert engine_cache("", {"HF_HOME": "/cache/hf"}).as_posix() == "/cache/hf/iei-engines"
    assert engine_cache("", {}).parts[-3:] == (".cache", "iei", "engines")


# --- the same vectors from every engine --------------------------------------------------------


@pytest.fixture(scope="module")
def torch_vectors(model_dirs, cache):
    """family -> torch float32 image vectors of the sample photos (the reference)."""

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, family: str) -> np.ndarray:
            embedder = loading.load_embedder(settings_for(model_dirs[family], cache), CPU, 2)
            try:
                self[family] = np.stack(embedder.embed(FILES))
            finally:
                embedder.close()
            return self[family]

    return Lazy()


@pytest.mark.parametrize(("engine", "precision"), EXPORTED, ids=lambda x: x)
@pytest.mark.parametrize("family", [*ORIGINAL_FAMILIES, *RETRIEVAL_FAMILIES])
def test_every_family_gives_the_same_image_vectors_on_every_engine(
    model_dirs, cache, torch_vectors, family, engine, precision
):
    settings = settings_for(model_dirs[family], cache, engine, precision)
    embedder = loading.load_embedder(settings, CPU, 2)
    try:
        assert embedder.choice == engines.Choice(engine, precision)
        vectors = np.stack(embedder.embed(FILES))
    finally:
        embedder.close()
    assert cosines(vectors, torch_vectors[family]).min() >= minimum_for(precision)


@pytest.mark.parametrize(("engine", "precision"), EXPORTED, ids=lambda x: x)
@pytest.mark.parametrize("family", JOINT_FAMILIES)
def test_every_text_tower_gives_the_same_vectors_on_every_engine(
    model_dirs, cache, family, engine, precision
):
    reference = loading.load_text_embedder(settings_for(model_dirs[family], cache), CPU)
    exported = loading.load_text_embedder(
        settings_for(model_dirs[family], cache, engine, precision), CPU
    )
    assert exported.choice == engines.Choice(engine, precision)
    expected = reference.forward(reference.tokenize(TEXTS))
    # Texts of other lengths than the export's example: the length axis stays dynamic.
    assert cosines(exported.forward(exported.tokenize(TEXTS)), expected).min() >= minimum_for(
        precision
    )


def test_info_says_which_engine_and_precision(model_dirs, cache):
    settings = settings_for(model_dirs["vit"], cache, "auto", "int8")
    embedder = loading.load_embedder(settings, CPU, 1)
    try:
        described = loading.describe(embedder, settings)
    finally:
        embedder.close()
    assert '"engine": "onnxruntime"' in described and '"dtype": "int8"' in described


# --- the export cache --------------------------------------------------------------------------


def test_a_second_load_finds_the_export_and_a_changed_model_exports_again(model_dirs, tmp_path):
    folder = tmp_path / "model"
    __import__("shutil").copytree(model_dirs["vit"], folder)
    settings = settings_for(folder, tmp_path / "cache", "openvino", "float32")

    first = loading.load_embedder(settings, CPU, 1)
    first.close()
    assert first.run.built  # type: ignore[attr-defined]
    done = first.run.entry / "done"  # type: ignore[attr-defined]
    exported_at = done.stat().st_mtime_ns

    second = loading.load_embedder(settings, CPU, 1)
    second.close()
    assert not second.run.built  # type: ignore[attr-defined]
    assert second.run.entry == first.run.entry  # type: ignore[attr-defined]
    assert done.stat().st_mtime_ns == exported_at  # nothing written again

    weights = next(folder.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    third = loading.load_embedder(settings, CPU, 1)
    third.close()
    assert third.run.built and third.run.entry != first.run.entry  # type: ignore[attr-defined]


def test_an_interrupted_export_leaves_no_entry(tmp_path):
    entry = tmp_path / "model" / "image-onnxruntime-float-0"

    def fails(folder):
        (folder / "half-written").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        engines.cached(entry, fails)
    assert not entry.exists()
    assert list(entry.parent.iterdir()) == [entry.parent / f".{entry.name}.lock"]
    assert engines.cached(entry, lambda folder: None) is True
    assert engines.cached(entry, lambda folder: None) is False


def test_each_openvino_precision_compiles_its_own_graph(model_dirs, tmp_path):
    """float32 and bfloat16 share one export, but not the CPU plugin's compiled graph: its cache
    is keyed by the model and the CPU's name only, so a bf16 load after a float32 one used to get
    the float32 graph back (cosine NaN on AMX CPUs in the bench, which runs both in one cache).
    The hint is forced, so the same path runs on any CPU (one without bf16 computes float32)."""
    loads = []
    for precision in ("float32", "bfloat16", "bfloat16", "float32"):
        settings = settings_for(model_dirs["vit"], tmp_path, "openvino", precision)
        embedder = loading.load_embedder(settings, CPU, 1)
        embedder.close()
        compiled = embedder.run.request.get_compiled_model()  # type: ignore[attr-defined]
        loads.append((embedder.run.entry, compiled.get_property("LOADED_FROM_CACHE")))  # type: ignore[attr-defined]
    assert len({entry for entry, _ in loads}) == 1  # one export
    assert [cached for _, cached in loads] == [False, False, True, True]


def test_openvinos_export_sends_no_telemetry_and_leaves_no_process(tmp_path):
    """OpenVINO's converter reports each use to Google Analytics (openvino-telemetry), each event
    from a child process: from a server, a report nobody asked for; offline, a child left waiting
    that held a CI run's exit. An export in a fresh interpreter, as in a Triton stub."""
    import subprocess
    import sys

    from fake_pb_utils import REPOSITORY

    code = f"""
import multiprocessing, sys, torch
sys.path.insert(0, {str(REPOSITORY)!r})
from iei_runtime import engines
ov = engines.openvino()
import openvino.tools.ovc.telemetry_utils as telemetry
assert telemetry.tm.__name__.endswith("telemetry_stub"), telemetry.tm
assert sys.modules.get("openvino_telemetry") is None
model = torch.nn.Linear(4, 2).eval()
converted = ov.convert_model(model, example_input=torch.ones(1, 4))
ov.save_model(converted, {str(tmp_path / "m.xml")!r})
assert not multiprocessing.active_children(), multiprocessing.active_children()
print("clean")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr[-2000:]
