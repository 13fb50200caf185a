"""How an encoder runs: eager torch, or an engine it is exported to once (ONNX Runtime, OpenVINO),
in float32, bfloat16, float16 or int8 (int8 weights, activations quantized at run time).

An encoder (encoders.py) is a plain module: the processor's tensors in, one vector per input out,
pooling included. The engines export exactly that graph, so every engine returns the same vectors
(float32 within cosine 0.9999 of torch; int8 within 0.99, tested per family). An export is cached
on disk, keyed by the model's files, the encoder, the precision and the engine's versions: a
restart loads it instead of exporting again.

Chosen by measurement on this project's 2-core x86 machine (docs/benchmarks.md has the
benchmark's figures): for ViT-B/16 at batch 8, ONNX Runtime's dynamic int8 (int8 weights, int8
activations quantized per call, no calibration data) ran about 2.5x torch float32 at cosine
0.9997, ahead of OpenVINO's data-free int8 (about 2.2x) and torchao's int8 without
torch.compile (about 1.8x); OpenVINO float32 ran about 1.1x torch float32, ONNX Runtime float32
about 1.0x. So int8 runs on ONNX Runtime, and float32 prefers OpenVINO.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .settings import resolve_dtype

log = logging.getLogger("iei")

ENGINES = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
# Export at least this batch; the batch axis (and a text's length) stay dynamic.
EXAMPLE_BATCH = 2


class EngineError(ValueError):
    """A choice of engine and precision that this machine or model cannot run: one line."""


@dataclass(frozen=True)
class Choice:
    engine: str
    precision: str


def installed(engine: str) -> bool:
    module = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}[engine]
    try:
        metadata.version(module)
    except metadata.PackageNotFoundError:
        return False
    return True


def choose(engine: str, precision: str, device: torch.device, native_bf16: bool) -> Choice:
    """Resolve `auto` and refuse what cannot run, in one line naming the settings.

    precision auto: float16 on a GPU, bfloat16 on a CPU with native bf16 (AMX, AVX-512 BF16),
    else float32; int8 is only ever the user's choice (it is not exact).
    engine auto: torch on a GPU, and for bfloat16 (native, and torch measured as fast as
    OpenVINO's bf16); the fastest exact engine measured here for float32 on a CPU (OpenVINO,
    when installed); ONNX Runtime for int8 (the fastest int8 without calibration data).
    """
    on_gpu = device.type == "cuda"
    if precision == "auto":
        precision = str(resolve_dtype("auto", device, native_bf16)).removeprefix("torch.")
    if engine == "auto":
        if on_gpu or precision in ("bfloat16", "float16"):
            engine = "torch"
        elif precision == "int8":
            engine = "onnxruntime"
        else:
            engine = "openvino" if installed("openvino") else "torch"
    if engine not in ENGINES:
        raise EngineError(f"IEI_ENGINE={engine!r}: expected auto, {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise EngineError(f"IEI_DTYPE={precision!r}: expected auto, {', '.join(PRECISIONS)}")
    if on_gpu and (engine != "torch" or precision == "int8"):
        raise EngineError(
            f"IEI_ENGINE={engine} IEI_DTYPE={precision}: on a GPU IEI runs torch in float32, "
            "bfloat16 or float16"
        )
    if not installed(engine):
        raise EngineError(f"IEI_ENGINE={engine}: {engine} is not installed (iei[engines])")
    if engine == "onnxruntime" and precision in ("bfloat16", "float16"):
        raise EngineError(
            f"IEI_ENGINE=onnxruntime IEI_DTYPE={precision}: ONNX Runtime's CPU provider has no "
            f"{precision} kernels; use torch or openvino, or float32 / int8"
        )
    if engine == "openvino" and precision == "float16":
        raise EngineError("IEI_ENGINE=openvino IEI_DTYPE=float16: use bfloat16 or float32")
    if precision == "int8" and engine != "onnxruntime":
        raise EngineError(
            f"IEI_ENGINE={engine} IEI_DTYPE=int8: int8 runs on onnxruntime (IEI_ENGINE=auto picks "
            "it; the fastest int8 measured without calibration data)"
        )
    if precision == "bfloat16" and not on_gpu and not native_bf16:
        log.warning("this CPU has no native bf16: bfloat16 runs emulated, slower than float32")
    return Choice(engine, precision)


# --- what an engine runs: the encoder with positional inputs -----------------------------------


class Positional(torch.nn.Module):
    """The encoder with positional inputs, in a fixed order: what the exporters trace."""

    def __init__(self, encoder: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.encoder(**dict(zip(self.names, tensors, strict=True)))
        return result


@dataclass(frozen=True)
class Signature:
    """The encoder's inputs: their names, an example of each, and which axes vary (the batch,
    and a text's length where the tokenizer pads to the longest text)."""

    names: tuple[str, ...]
    example: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, str]]

    @classmethod
    def of(cls, example: dict[str, torch.Tensor], varying: dict[str, dict[int, str]]) -> Signature:
        names = tuple(example)
        dynamic = {name: {0: "batch", **varying.get(name, {})} for name in names}
        return cls(names, example, dynamic)


# --- the runners: called as the encoder is, with keyword tensors; (N, D) float32 out ----------


class Exported:
    """A runner of an exported encoder; where its export lives, and whether it was made now."""

    entry: Path
    built: bool

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        how = "exported to" if self.built else "loaded from the cache at"
        return f"{how} {self.entry}"


class OnnxRuntimeRunner(Exported):
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle threads sleep rather than spin: the cores are shared with the decode threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.types = {i.name: i.type for i in self.session.get_inputs()}

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: as_numpy(inputs[name], kind) for name, kind in self.types.items()}
        [vectors] = self.session.run(None, feed)
        return torch.from_numpy(np.asarray(vectors, dtype=np.float32))


class OpenVinoRunner(Exported):
    def __init__(self, path: Path, precision: str, threads: int, names: tuple[str, ...]) -> None:
        ov = openvino()

        hint = "bf16" if precision == "bfloat16" else "f32"
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # the decode threads share these cores
            # The CPU plugin would pick bf16 on a CPU that has it: float32 must stay exact.
            "INFERENCE_PRECISION_HINT": hint,
            # A restart skips the plugin's compile. One folder per precision: the CPU plugin
            # keys its compiled blobs by the model and the CPU's name only (its
            # CACHING_PROPERTIES), not by this hint, so a bf16 compile after a float32 one of
            # the same export loaded the float32 graph and ran it in bf16 (cosine NaN on AMX
            # in the bench, which runs both in one cache), and float32 could load a bf16 one.
            "CACHE_DIR": str(path.parent / f"compiled-{hint}"),
        }
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = compiled.create_infer_request()
        # Inputs in the order they were exported (an input's tensor name may not survive).
        kinds = [port.get_element_type() for port in compiled.inputs]
        self.inputs = list(zip(names, kinds, strict=True))

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = [
            np.ascontiguousarray(inputs[name].cpu().numpy().astype(kind.to_dtype()))
            for name, kind in self.inputs
        ]
        result = self.request.infer(feed)
        return torch.from_numpy(np.array(result.to_tuple()[0], dtype=np.float32))


def as_numpy(tensor: torch.Tensor, onnx_type: str) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    if "int64" in onnx_type:
        return array.astype(np.int64, copy=False)
    if "int32" in onnx_type:
        return array.astype(np.int32, copy=False)
    return array.astype(np.float32, copy=False)


# --- export, and its cache ---------------------------------------------------------------------


def export_onnx(encoder: torch.nn.Module, signature: Signature, path: Path) -> None:
    module = Positional(encoder, signature.names).eval()
    axes: dict[str, Any] = {}  # one Dim per axis name: "batch" is shared by every input
    shapes = tuple(
        {axis: axes.setdefault(name, torch.export.Dim(name, min=1, max=4096))
         for axis, name in signature.dynamic[input_name].items()}
        for input_name in signature.names
    )  # fmt: skip
    with torch.inference_mode(), transformers_checks_off():
        program = torch.onnx.export(
            module,
            tuple(signature.example[name] for name in signature.names),
            dynamo=True,
            input_names=list(signature.names),
            output_names=["vectors"],
            dynamic_shapes={"tensors": shapes},
            verbose=False,
        )
    program.save(str(path))


def quantize_onnx(source: Path, target: Path) -> None:
    """int8 weights (per output channel) and int8 activations quantized per call: no data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Its advice to pre-process the graph first goes to the root logger; the graph is exported
    # by torch already optimised for inference.
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
        )  # fmt: skip
    finally:
        logging.disable(logging.NOTSET)


def export_openvino(encoder: torch.nn.Module, signature: Signature, path: Path) -> None:
    ov = openvino()

    module = Positional(encoder, signature.names).eval()
    example = tuple(signature.example[name] for name in signature.names)
    with torch.inference_mode(), transformers_checks_off():
        converted = ov.convert_model(module, example_input=example)
    shapes = {}
    for port, name in zip(converted.inputs, signature.names, strict=True):
        varying = signature.dynamic[name]
        fixed = signature.example[name].shape
        shapes[port] = ov.PartialShape([-1 if a in varying else s for a, s in enumerate(fixed)])
        port.get_tensor().set_names({name})
    converted.reshape(shapes)
    ov.save_model(converted, str(path), compress_to_fp16=False)  # fp16 storage would not be exact


def openvino() -> Any:
    """The `openvino` module, without its telemetry. OpenVINO's model converter reports each use
    to Google Analytics (the openvino-telemetry package: on unless a consent file in the user's
    home or CI=true says no), each event from a process of its own: from a server, a report
    nobody asked for, and offline a child process left waiting, which held a test session's exit.
    The converter falls back to its own stub when that package cannot be imported: it is blocked
    before openvino is first imported."""
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino as ov

    return ov


@contextlib.contextmanager
def transformers_checks_off() -> Iterator[None]:
    """transformers' run-time checks on tensors trace to ops the ONNX exporter cannot translate
    (SigLIP2 NaFlex); its documented switch turns them off while exporting. The tracers' own
    warnings (a Python bool taken from a tensor: shapes, which are fixed per input) go too."""
    previous = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            yield
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = previous


def model_files(model_id: str) -> Path | None:
    """The folder of a model's files: a local folder, or the hub cache's snapshot of an id."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # no hub library, or an id it refuses: nothing to fingerprint
        return None
    return Path(found).parent if isinstance(found, str) else None


def fingerprint(folder: Path | None, model_id: str) -> str:
    """Changes when the checkpoint does: path, name, size and mtime of every file (a hub
    snapshot's folder is named by its commit), cheap to take."""
    digest = hashlib.sha256(model_id.encode())
    if folder is not None:
        digest.update(str(folder).encode())
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(
                f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
            )
    return digest.hexdigest()


def versions(engine: str, int8: bool) -> dict[str, str]:
    names = ["torch", "transformers"]
    if engine == "onnxruntime":
        names += ["onnxruntime", "onnxscript", "onnx"]
    if engine == "openvino":
        names.append("openvino")
    return {name: metadata.version(name) for name in names}


def cache_entry(cache: Path, model_id: str, role: str, choice: Choice, described: str) -> Path:
    """Where the export of this model's `role` encoder (image, text) for `choice` lives."""
    int8 = choice.precision == "int8"
    key = {
        "model": fingerprint(model_files(model_id), model_id),
        "encoder": described,  # class, pooling, inputs: what the graph computes
        "engine": choice.engine,
        "quantized": int8,
        "versions": versions(choice.engine, int8),
        "format": 1,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id.strip("/"))[-60:]
    return cache / slug / f"{role}-{choice.engine}-{'int8' if int8 else 'float'}-{digest}"


def cached(entry: Path, build: Callable[[Path], None]) -> bool:
    """Build `entry` once: in a temporary folder beside it, renamed into place, under a lock, so
    that instances starting together export once. True when it was built now."""
    if (entry / "done").exists():
        return False
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / "done").exists():
            return False
        building = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            started = time.monotonic()
            build(building)
            (building / "done").write_text(json.dumps({"seconds": time.monotonic() - started}))
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(building, entry)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return True


def exported_runner(
    encoder: torch.nn.Module,
    signature: Signature,
    choice: Choice,
    *,
    threads: int,
    cache: Path,
    model_id: str,
    role: str,
    describe: str,
) -> Exported:
    """`encoder` (float32, on the CPU) exported to `choice.engine` once, cached: called as the
    encoder is, with keyword tensors; (N, D) float32 out."""
    entry = cache_entry(cache, model_id, role, choice, describe)
    int8 = choice.precision == "int8"
    encoder = encoder.float().eval()
    if choice.engine == "onnxruntime":

        def build(folder: Path) -> None:
            export_onnx(encoder, signature, folder / "float32.onnx")
            if int8:
                quantize_onnx(folder / "float32.onnx", folder / "model.onnx")
                for exported in folder.glob("float32.onnx*"):
                    exported.unlink()
            else:
                (folder / "float32.onnx").rename(folder / "model.onnx")

        built = cached(entry, build)
        run: Exported = OnnxRuntimeRunner(entry / "model.onnx", threads)
    else:
        built = cached(entry, lambda f: export_openvino(encoder, signature, f / "model.xml"))
        run = OpenVinoRunner(entry / "model.xml", choice.precision, threads, signature.names)
    run.entry, run.built = entry, built
    return run
