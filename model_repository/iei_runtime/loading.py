"""Load the model, its processor or tokenizer for an instance, and describe what was loaded.

A dual encoder (CLIP, SigLIP, SigLIP2) is loaded one tower at a time from its full checkpoint:
the image model holds the vision tower with its projection, the text model the text tower.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from inspect import signature
from typing import Any

import torch

from . import cuda_graphs, engines
from .embedder import Embedder, Preprocessor, run_encoder, to_device
from .encoders import PooledEncoder, TowerEncoder
from .families import (
    PROJECTED,
    Towers,
    in_joint_space,
    resolve_pooling,
    serves_texts,
    text_context,
    towers,
)
from .images import draft_side
from .jpeg_decoders import choose_jpeg_decoder
from .pass_plan import Plan, measured_plan, measured_threads, timing_alone
from .settings import (
    DTYPES,
    ModelSettings,
    cpu_has_native_bf16,
    engine_cache,
    resolve_forward_batch_size,
)
from .stages import UINT8_PIXELS, CountFallback, EncodeStage, PreprocessStage, no_count
from .texts import TextEmbedder, folds_case

log = logging.getLogger("iei")


class ModelLoadError(RuntimeError):
    """Why the model cannot be served, in the one line the launcher shows at start-up."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(f"IEI cannot load model {model_id!r} (IMAGE_EMBEDDING_MODEL): {reason}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Loading one tower of a checkpoint lists the other tower's weights as unexpected, at
    warning level, at length; what matters (missing weights) is checked instead."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def tower_config(config: Any, part: str) -> Any:
    """The config of one tower (`vision_config`, `text_config`) with the checkpoint's real
    projection size: the top level's `projection_dim`, which the full model builds both
    projections with. LAION's OpenCLIP conversions keep a default 512 inside the towers (top
    level 1280 for ViT-bigG; transformers #25622): read from the tower alone, the projection
    weights would not fit and loading fails."""
    tower = copy.deepcopy(getattr(config, part))
    projection = getattr(config, "projection_dim", None)
    if projection is not None and hasattr(tower, "projection_dim"):
        tower.projection_dim = projection
    return tower


def load_tower(class_name: str, model_id: str, dtype: torch.dtype, config: Any) -> Any:
    """One tower of a dual encoder, from the full checkpoint (`config`: the tower's, from
    `tower_config`); every weight must be found (a missing one would be random, and its vectors
    silently wrong)."""
    import transformers

    with quiet_transformers():
        model, loading = getattr(transformers, class_name).from_pretrained(
            model_id, config=config, dtype=dtype, output_loading_info=True
        )
    missing = loading.get("missing_keys") or []
    if missing:
        raise ValueError(f"{class_name} misses {len(missing)} weights, e.g. {sorted(missing)[0]}")
    return model


def load_image_model(model_id: str, config: Any, pooling: str, dtype: torch.dtype) -> Any:
    from transformers import AutoModel

    joint = towers(config.to_dict())
    if joint is not None:
        return load_tower(joint.vision if pooling == PROJECTED else joint.vision_plain,
                          model_id, dtype, tower_config(config, "vision_config"))  # fmt: skip
    kwargs = {}
    accepted = signature(AutoModel._model_mapping[type(config)]).parameters
    if pooling != "pooler" and "add_pooling_layer" in accepted:
        # A classification checkpoint has no pooler weights; don't build a random one.
        kwargs["add_pooling_layer"] = False
    with quiet_transformers():
        model, loading = AutoModel.from_pretrained(
            model_id, config=config, dtype=dtype, output_loading_info=True, **kwargs
        )
    missing = sorted(loading.get("missing_keys") or [])
    pooler = [key for key in missing if "pooler" in key]
    if pooling == "pooler" and pooler:
        # ViT/DeiT classification checkpoints (the default model among them) drop the pooler:
        # it would be random, and its vectors differ from one start to the next.
        raise ValueError(
            f"IEI_POOLING=pooler: the checkpoint has no weights for the model's pooler (e.g. "
            f"{pooler[0]}), which would be random; use IEI_POOLING=mean or cls"
        )
    if missing:
        raise ValueError(f"{type(model).__name__} misses {len(missing)} weights, e.g. {missing[0]}")
    return model


# The checkpoint's files that may hold the full model's weights, in transformers' order of choice.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
# What a text model's threads are timed on (measure_threads): a caption's length, as search
# queries and labels are.
THREADS_PROBE_TEXT = "a photo of a dog playing with a ball on the grass"


def zero_shot_facts(model_id: str, joint: Towers) -> dict[str, Any]:
    """What `/classify` needs beside the two towers' vectors: the full model's `logit_scale`
    (and SigLIP's `logit_bias`), read alone from the checkpoint (the image model loads only
    the vision tower). `logit_scale` is reported as the multiplier, exp() of the parameter, as
    the model's forward pass applies it: logits = logit_scale · cosine + logit_bias."""
    names = ("logit_scale", "logit_bias") if joint.zero_shot == "sigmoid" else ("logit_scale",)
    values = checkpoint_scalars(model_id, names)
    if "logit_scale" not in values:
        raise ValueError("the checkpoint has no logit_scale (a tower saved alone?)")
    return {
        "zero_shot": joint.zero_shot,
        "logit_scale": math.exp(values["logit_scale"]),
        "logit_bias": values.get("logit_bias", 0.0),
    }


def checkpoint_scalars(model_id: str, names: tuple[str, ...]) -> dict[str, float]:
    """The named top-level scalars of a checkpoint (a folder or a hub id), without loading the
    other weights: safetensors reads one tensor; a pickled checkpoint is memory-mapped."""
    from transformers.utils import cached_file

    located = (
        (filename, cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False))
        for filename in WEIGHT_FILES
    )
    filename, path = next(((f, p) for f, p in located if p), ("", None))
    if path is None:
        raise ValueError(f"no weights file ({', '.join(WEIGHT_FILES)})")
    if filename == "pytorch_model.bin":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {n: float(state[n].reshape(-1)[0]) for n in names if n in state}
    files = {name: path for name in names}
    if filename.endswith(".index.json"):  # sharded: the shard that holds each scalar
        with open(path) as index:
            weight_map = json.load(index)["weight_map"]
        files = {n: cached_file(model_id, weight_map[n]) for n in names if n in weight_map}
    from safetensors import safe_open

    values = {}
    for name, file in files.items():
        if file is None:
            continue
        with safe_open(file, framework="pt") as weights:
            if name in weights.keys():  # noqa: SIM118 (safe_open has no __contains__)
                values[name] = float(weights.get_tensor(name).float().reshape(-1)[0])
    return values


def describe(embedder: Embedder, settings: ModelSettings, **more: Any) -> str:
    """The MODEL_INFO output: facts a client cannot see from outside, as JSON (`more`: the
    layout's own)."""
    facts = embedder.model_facts
    context = text_context(facts, embedder.encoder.pooling)  # None: no texts with this pooling
    return json.dumps(
        {
            "model_id": settings.model_id,
            "model_type": facts.get("model_type"),
            "architecture": embedder.encoder.architecture,
            "engine": embedder.choice.engine,
            "dtype": embedder.choice.precision,
            "device": str(embedder.device),
            "pooling": embedder.encoder.pooling,
            "forward_batch_size": embedder.forward_batch_size,
            "forward_threads": embedder.forward_threads,  # CPU threads of a pass
            # Pass sizes this CPU runs faster as several smaller passes (pass_plan.py).
            "forward_splits": {str(n): list(parts) for n, parts in embedder.pass_plan.items()},
            "modalities": ["image", "text"] if context else ["image"],
            "text_context_length": context,
            **(embedder.zero_shot if context else {}),
            **more,
        }
    )


def choose_engine(settings: ModelSettings, device: torch.device) -> engines.Choice:
    """IEI_ENGINE and IEI_DTYPE resolved for this device, or the one line why not."""
    try:
        return engines.choose(settings.engine, settings.dtype, device, cpu_has_native_bf16())
    except engines.EngineError as exc:
        raise ModelLoadError(settings.model_id, str(exc)) from None


def torch_dtype(choice: engines.Choice) -> torch.dtype:
    """The dtype torch loads the model in: the precision for torch; float32 to export from."""
    return DTYPES[choice.precision] if choice.engine == "torch" else torch.float32


def with_engine(
    embedder: Any,
    choice: engines.Choice,
    settings: ModelSettings,
    role: str,
    example: dict[str, torch.Tensor],
    varying: dict[str, dict[int, str]],
    threads: int,
) -> None:
    """Run `embedder`'s encoder on `choice.engine` (exported once, cached), when not torch."""
    embedder.choice = choice
    if choice.engine == "torch":
        return
    encoder = embedder.encoder
    signature = engines.Signature.of(example, varying)
    shapes = {name: list(tensor.shape[1:]) for name, tensor in example.items()}
    described = f"{encoder.architecture} {type(encoder).__name__} {encoder.pooling} {shapes}"
    try:
        embedder.run = engines.exported_runner(
            encoder, signature, choice, threads=threads, model_id=settings.model_id, role=role,
            cache=engine_cache(settings.engine_cache, dict(os.environ)), describe=described,
        )  # fmt: skip
    except Exception as exc:  # an exporter's or quantizer's failure: this model cannot go there
        if settings.engine == "auto":  # a choice IEI made, not the user: torch serves it
            embedder.choice = engines.Choice("torch", "float32")
            log.warning("%s encoder stays on torch: %s cannot export it (%s)",
                        role, choice.engine, first_line(exc))  # fmt: skip
            return
        reason = (
            f"IEI_ENGINE={choice.engine} IEI_DTYPE={choice.precision}: cannot export "
            f"{encoder.architecture} ({first_line(exc)}); IEI_ENGINE=torch serves it"
        )
        raise ModelLoadError(settings.model_id, reason) from None


def engine_line(embedder: Any) -> str:
    """What runs the encoder, for the instance's log line."""
    choice = embedder.choice
    line = f"{choice.engine} {choice.precision}"
    graphs = isinstance(embedder.run, cuda_graphs.GraphedRunner)
    if choice.engine != "torch" or graphs:
        line = f"{line} ({embedder.run.describe()})"
    # Image models on a CPU: the threads of a pass and how passes are cut (pass_plan.py).
    notes = [getattr(embedder, "thread_note", ""), getattr(embedder, "pass_note", "")]
    return ", ".join([line, *filter(None, notes)])


def load_embedder(settings: ModelSettings, device: torch.device, threads: int) -> Embedder:
    """Load the model and its processor; one clear error when that is impossible, or when the
    model cannot do the pooling asked for. The first forward pass (the check) warms it up; then
    the encoder moves to its engine (engines.py) when that is not torch."""
    from transformers import AutoConfig, AutoImageProcessor

    choice = choose_engine(settings, device)
    dtype = torch_dtype(choice)
    if settings.cuda_graphs and device.type != "cuda":
        raise ModelLoadError(settings.model_id, str(cuda_graphs.refusal(device)))
    try:
        config = AutoConfig.from_pretrained(settings.model_id)
        facts = config.to_dict()
        pooling = resolve_pooling(settings.pooling, facts)
        processor = AutoImageProcessor.from_pretrained(settings.model_id)
        model = load_image_model(settings.model_id, config, pooling, dtype)
    except Exception as exc:
        raise ModelLoadError(settings.model_id, first_line(exc)) from None
    model.eval().to(device)
    joint = towers(facts)
    encoder = (
        TowerEncoder(model, joint.image_output)
        if joint is not None and pooling == PROJECTED
        else PooledEncoder(model, pooling)
    )
    embedder = Embedder(
        encoder,
        processor,
        device=device,
        dtype=dtype,
        max_image_pixels=settings.max_image_pixels,
        forward_batch_size=resolve_forward_batch_size(settings.forward_batch_size, device),
        decode_threads=threads,
        draft_side=draft_side(processor),
        jpeg_draft=settings.jpeg_draft,
        pixel_budget=settings.decode_pixel_budget,
        preprocess_device=device if device.type == "cuda" else None,
        model_facts=facts,
        fuse=settings.fused_preprocess,
    )
    if joint is not None and in_joint_space(facts, pooling):  # SigLIP's pooler output too
        try:
            embedder.zero_shot = zero_shot_facts(settings.model_id, joint)
        except Exception as exc:
            embedder.close()
            reason = f"zero-shot scores (logit_scale): {first_line(exc)}"
            raise ModelLoadError(settings.model_id, reason) from None
    try:
        embedder.forward(embedder.blank(1))
    except ValueError as exc:  # pooling.pool: e.g. no CLS token in a convolutional map
        embedder.close()
        reason = f"IEI_POOLING={settings.pooling}: {first_line(exc)}"
        raise ModelLoadError(settings.model_id, reason) from None
    if device.type == "cpu":
        threads = chosen_threads(embedder, settings, threads)
    try:
        with_engine(embedder, choice, settings, "image", embedder.blank(2), {}, threads)
    except ModelLoadError:
        embedder.close()
        raise
    if settings.cuda_graphs:  # IEI_CUDA_GRAPHS: on a GPU, with torch (what runs there)
        example = {name: to_device(t, device, dtype) for name, t in embedder.blank(1).items()}
        embedder.run = cuda_graphs.graphed(
            embedder.run, example, device, embedder.forward_batch_size
        )
    # The engine's first runs, at the shapes of real executions: a single image and a full
    # forward pass (kernels and buffers chosen before the first request, not during it).
    for count in sorted({1, embedder.forward_batch_size}):
        embedder.forward(embedder.blank(count))
    if device.type == "cpu":
        with timing_alone():
            if not settings.forward_threads and embedder.choice.engine == "torch":
                # auto: as many as pay (an engine has its own threads, set when it was built)
                embedder.forward_threads, embedder.thread_note = measure_threads(embedder, threads)
                embedder.forward(embedder.blank(1))  # a single image's kernels, on those threads
            if settings.forward_batch_size == 0:  # auto: sizes by measurement
                embedder.pass_plan, embedder.pass_note = plan_passes(embedder)
    return embedder


def chosen_threads(embedder: Embedder | TextEmbedder, settings: ModelSettings, threads: int) -> int:
    """The CPU threads of `embedder`'s passes before any is measured, kept on it: IEI_FORWARD_
    THREADS when it is a count (set as torch's, with a line for the log), else the instance's
    `threads`. Only torch's global setting changes: a decode thread keeps its own one thread."""
    if settings.forward_threads:
        threads = settings.forward_threads
        torch.set_num_threads(threads)
        embedder.thread_note = f"threads per pass: {threads} (IEI_FORWARD_THREADS)"
    embedder.forward_threads = threads
    return threads


def measure_threads(embedder: Embedder | TextEmbedder, most: int) -> tuple[int, str]:
    """Time a full pass (grey images, or short texts) on `most` threads and fewer: the most
    threads whose parallel efficiency pays (pass_plan.py), set as torch's for the passes."""
    if isinstance(embedder, TextEmbedder):
        full = embedder.tokenize([THREADS_PROBE_TEXT] * embedder.forward_batch_size)
    else:
        full = embedder.blank(embedder.forward_batch_size)
    return measured_threads(lambda: embedder.forward(full), torch.set_num_threads, most)


def plan_passes(embedder: Embedder) -> tuple[Plan, str]:
    """Time the encoder's passes of each size up to forward_batch_size on grey images, through
    whatever runs it (torch or an engine): the sizes this CPU runs faster split (pass_plan.py)."""
    full = embedder.blank(embedder.forward_batch_size)

    def run_pass(size: int) -> object:
        part = {name: tensor[:size] for name, tensor in full.items()}
        return run_encoder(
            embedder.run, part, device=embedder.device, dtype=embedder.dtype,
            forward_batch_size=size,
        )  # fmt: skip

    return measured_plan(run_pass, embedder.forward_batch_size)


def defers_jpegs(setting: str) -> bool:
    """Whether the split layout's encoder decodes plain JPEGs (IEI_JPEG_DECODER): the
    preprocessing instances (on the CPU) then pass them on as files."""
    return setting in ("torchvision", "nvimagecodec") or (
        setting == "auto" and torch.cuda.is_available()
    )


def load_preprocess_stage(
    settings: ModelSettings, threads: int, count_fallback: CountFallback = no_count
) -> PreprocessStage:
    """The split layout's CPU step: the model's image processor alone (no model weights);
    `count_fallback` counts the images it decodes although the encoder has a tensor decoder."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(settings.model_id)
    except Exception as exc:
        raise ModelLoadError(settings.model_id, first_line(exc)) from None
    preprocessor = Preprocessor(
        processor,
        device=torch.device("cpu"),
        max_image_pixels=settings.max_image_pixels,
        decode_threads=threads,
        draft_side=draft_side(processor),
        jpeg_draft=settings.jpeg_draft,
        pixel_budget=settings.decode_pixel_budget,
        processor_options=UINT8_PIXELS,
        fuse=settings.fused_preprocess,
    )
    try:
        return PreprocessStage(
            preprocessor,
            defer_jpegs=defers_jpegs(settings.jpeg_decoder),
            count_fallback=count_fallback,
        )
    except ValueError as exc:
        preprocessor.close()
        raise ModelLoadError(settings.model_id, str(exc)) from None


def load_encode_stage(
    settings: ModelSettings,
    device: torch.device,
    threads: int,
    count_fallback: CountFallback = no_count,
) -> EncodeStage:
    """The split layout's device step: the model (warmed up at real shapes by load_embedder)
    and its JPEG decoder (refused here, in one line, when its warm-up decode fails)."""
    embedder = load_embedder(settings, device, threads)
    try:
        decoder = choose_jpeg_decoder(settings.jpeg_decoder, device)
        return EncodeStage(embedder, decoder, count_fallback=count_fallback)
    except ValueError as exc:
        embedder.close()
        raise ModelLoadError(settings.model_id, str(exc)) from None


def load_text_embedder(settings: ModelSettings, device: torch.device) -> TextEmbedder:
    """The text tower and tokenizer of a dual encoder; one clear error for any other model."""
    from transformers import AutoConfig, AutoTokenizer

    choice = choose_engine(settings, device)
    dtype = torch_dtype(choice)
    try:
        config = AutoConfig.from_pretrained(settings.model_id)
        facts = config.to_dict()
        joint = towers(facts)
        if joint is None:
            raise ValueError(
                f"a {facts.get('model_type')} model has no text tower whose vectors share the "
                "image space (texts need a CLIP, SigLIP or SigLIP2 model)"
            )
        if not serves_texts(facts, settings.pooling):
            raise ValueError(
                f"IEI_POOLING={settings.pooling}: the image vectors leave the space this "
                f"{facts.get('model_type')} model's texts share, so it serves no texts "
                "(IEI_POOLING=auto serves both)"
            )
        tokenizer = AutoTokenizer.from_pretrained(settings.model_id)
        text_tower = tower_config(config, "text_config")
        model = load_tower(joint.text, settings.model_id, dtype, text_tower)
    except Exception as exc:
        raise ModelLoadError(settings.model_id, first_line(exc)) from None
    model.eval().to(device)
    embedder = TextEmbedder(
        TowerEncoder(model, joint.text_output),
        tokenizer,
        device=device,
        dtype=dtype,
        context=text_context(facts) or joint.context,
        pad_to_context=joint.pad_to_context,
        lower_case=joint.lower_case and not folds_case(tokenizer),
        max_chars=settings.max_text_chars,
        forward_batch_size=resolve_forward_batch_size(settings.forward_batch_size, device),
    )
    example = embedder.tokenize(["a photo of a cat", "two dogs"])
    # Padded to the longest text, the length varies from one batch to the next.
    varying = {} if joint.pad_to_context else {name: {1: "length"} for name in example}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        threads = chosen_threads(embedder, settings, threads)
    with_engine(embedder, choice, settings, "text", example, varying, threads)
    embedder.warm_up()
    if device.type == "cpu" and not settings.forward_threads and embedder.choice.engine == "torch":
        with timing_alone():
            embedder.forward_threads, embedder.thread_note = measure_threads(embedder, threads)
        embedder.warm_up()  # on the threads chosen
    return embedder
