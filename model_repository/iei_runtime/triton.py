"""What the Triton models share about Triton itself: their instances, their requests, and
responses with per-request errors. The one module here that imports Triton's
`triton_python_backend_utils`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from .resources import available_cores
from .settings import ModelSettings, read_settings
from .stages import FALLBACK_REASONS

INPUT_NAME = "IMAGE"  # model `iei`: the encoded image file
TEXT_INPUT_NAME = "TEXT"  # model `iei_text`: the text, UTF-8
OUTPUT_NAME = "EMBEDDING"
INFO_OUTPUT_NAME = "MODEL_INFO"
TOKENS_OUTPUT_NAME = "TOKENS"  # model `iei_text`: the text's tokens before truncation


# Images decoded by PIL although a tensor decoder is configured (IEI_JPEG_DECODER), by reason
# (stages.FALLBACK_REASONS): on Triton's metrics endpoint, beside its own nv_* metrics.
FALLBACK_METRIC = "iei_pil_fallback_total"


class FallbackCounter:
    """Counts fallbacks to PIL in a Triton custom metric (a counter labelled by model and reason;
    the Python backend has them since 23.05). Where Triton runs without metrics, counts nothing."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.metrics: dict[str, Any] = {}
        try:
            self.family: Any = pb_utils.MetricFamily(
                name=FALLBACK_METRIC,
                description="Images decoded by PIL although IEI_JPEG_DECODER names a tensor "
                "decoder",
                kind=pb_utils.MetricFamily.COUNTER,
            )
        except Exception as exc:  # metrics disabled (--allow-metrics=false)
            pb_utils.Logger.log_warn(f"{model}: PIL fallbacks not counted: {exc}")
            self.family = None
            return
        for reason in FALLBACK_REASONS:  # every series from 0, so that a rate can be taken
            labels = {"model": model, "reason": reason}
            self.metrics[reason] = self.family.Metric(labels=labels)

    def __call__(self, reason: str, count: int) -> None:
        if self.family is not None:
            self.metrics[reason].increment(count)


# Triton restarts so far by the launcher (iei.contract: the same names), shown by the default
# model's instances, which are always loaded: `iei` (single layout) or its first step (split).
RESTARTS_ENV = "IEI_TRITON_RESTARTS"
RESTARTS_METRIC = "iei_triton_restarts"
RESTARTS_SHOWN_BY = ("iei", "iei_preprocess")


def show_restarts(args: dict[str, str], environ: dict[str, str]) -> list[Any]:
    """The restarts the launcher counted before this Triton started, set on a gauge per reason,
    by the default model's first instance (Triton shares one series between the instances that
    make it, and drops it when the first of them goes). What it returns, the family and its
    metrics, must be kept: Triton drops a metric, or a family, with its object. Nothing for
    other models and instances, without the launcher's count, or where Triton runs without
    metrics."""
    given = environ.get(RESTARTS_ENV)
    model = args.get("model_name", "")
    first = args.get("model_instance_name") == f"{model}_0_0"  # `<model>_<group>_<index>`
    if model not in RESTARTS_SHOWN_BY or not first or not given:
        return []
    try:
        counts = {r: int(n) for r, n in (item.split("=") for item in given.split(","))}
        family = pb_utils.MetricFamily(
            name=RESTARTS_METRIC,
            description="Restarts of this Triton by its launcher (iei serve / iei triton) so far, "
            "by reason",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        kept = [family]
        for reason, count in counts.items():
            metric = family.Metric(labels={"reason": reason})
            metric.set(count)
            kept.append(metric)
    except Exception as exc:  # metrics disabled (--allow-metrics=false), a foreign value
        pb_utils.Logger.log_warn(f"{model}: Triton restarts not shown: {exc}")
        return []
    return kept


def instance_count(model_config: dict[str, Any]) -> int:
    """Instances of this model on this machine (the CPU threads are shared between them)."""
    groups = model_config.get("instance_group") or [{"count": 1}]
    return max(1, sum(int(g.get("count", 1)) for g in groups))


def start_instance(args: dict[str, str]) -> tuple[ModelSettings, torch.device, int]:
    """What `initialize` gets from Triton, resolved: the settings (environment > config.pbtxt
    parameters > defaults), this instance's device (made torch's current one) and CPU threads."""
    model_config = json.loads(args["model_config"])
    settings = read_settings(model_config, dict(os.environ))
    return (settings, *instance_device(args, model_config))


def instance_device(args: dict[str, str], model_config: dict[str, Any]) -> tuple[torch.device, int]:
    """The device of this instance (made torch's current one) and its CPU threads."""
    if args["model_instance_kind"] == "GPU":
        device = torch.device("cuda", int(args["model_instance_device_id"]))
        torch.cuda.set_device(device)
        return device, available_cores()
    # instances x threads <= cores, so instances don't fight over the same cores.
    threads = max(1, available_cores() // instance_count(model_config))
    torch.set_num_threads(threads)
    return torch.device("cpu"), threads


def gather_inputs(requests: Sequence[Any], name: str) -> tuple[list[bytes], list[range]]:
    """Every item of input `name` over a dynamic batch, and each request's span of them."""
    items: list[bytes] = []
    spans = []
    for request in requests:
        tensor = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
        start = len(items)
        items.extend(bytes(b) for b in tensor.reshape(-1))
        spans.append(range(start, len(items)))
    return items, spans


def make_response(
    results: Sequence[np.ndarray | ValueError],
    input_name: str = INPUT_NAME,
    extra: dict[str, np.ndarray] | None = None,
) -> Any:
    """One request's results -> its response: vectors (and `extra` outputs, one row per item),
    or an error naming the first bad item.

    The message format `IMAGE[i]: reason` / `TEXT[i]: reason` (i = position inside this request)
    is parsed by the frontend to name the failing input of a client's request.
    """
    failed = error_response(results, input_name)
    if failed is not None:
        return failed
    vectors = np.stack(results).astype(np.float32, copy=False)  # type: ignore[arg-type]
    tensors = [pb_utils.Tensor(OUTPUT_NAME, vectors)]
    tensors += [pb_utils.Tensor(name, rows) for name, rows in (extra or {}).items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(results: Sequence[object], input_name: str = INPUT_NAME) -> Any | None:
    """The response that fails a request at its first bad item, or None when there is none."""
    for i, result in enumerate(results):
        if isinstance(result, ValueError):
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(
                    f"{input_name}[{i}]: {result}", pb_utils.TritonError.INVALID_ARG
                )
            )
    return None


def vector_responses(
    requests: Sequence[Any], spans: Sequence[range], results: Sequence[Any], info: str
) -> list[Any]:
    """Each image request's response over a dynamic batch's `results`: its vectors (and
    MODEL_INFO when it asked for it), or the error of its first bad image."""
    responses = []
    for request, span in zip(requests, spans, strict=True):
        own = results[span.start : span.stop]
        wants_info = INFO_OUTPUT_NAME in request.requested_output_names()
        extra = {INFO_OUTPUT_NAME: info_rows(info, len(own))} if wants_info else None
        responses.append(make_response(own, INPUT_NAME, extra))
    return responses


def info_rows(info: str, count: int) -> np.ndarray:
    """The MODEL_INFO output: the same JSON on every row."""
    return np.full((count, 1), info.encode(), dtype=np.object_)
