"""Zero-shot classification (`POST /classify`): each image scored against text labels with the
model's own zero-shot head, as its `logits_per_image` does it:

    logits = logit_scale · cosine(image, hypothesis) + logit_bias

then CLIP a softmax over the labels, SigLIP and SigLIP2 a sigmoid per label. The scalars come
from the model itself (its MODEL_INFO: `zero_shot`, `logit_scale` already exp'ed, `logit_bias`),
read once from its checkpoint by the Triton model: the frontend needs no torch.

The hypotheses' vectors are kept in a small LRU per worker, keyed by model, template and label:
a label set used again does not reach Triton's text model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models import ServedModel
from .embedding import (
    IMAGE,
    TEXT,
    Embedded,
    Input,
    Services,
    embed_inputs,
    load_within,
    normalize_rows,
    together,
)
from .errors import ApiError, ErrorType

SOFTMAX, SIGMOID = "softmax", "sigmoid"


@dataclass(frozen=True)
class ZeroShot:
    kind: str  # SOFTMAX or SIGMOID
    logit_scale: float  # the multiplier (exp of the checkpoint's parameter)
    logit_bias: float

    def scores(self, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
        """(N, L) probabilities of N images against L hypotheses (raw vectors of both)."""
        cosine = normalize_rows(images).astype(np.float64) @ normalize_rows(texts).T
        logits = self.logit_scale * cosine + self.logit_bias
        if self.kind == SOFTMAX:
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            return exp / exp.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-logits))


def zero_shot_of(info: dict[str, Any], model: ServedModel) -> ZeroShot:
    """The model's zero-shot head from its facts; a 422 naming it when it has none."""
    kind = info.get("zero_shot")
    if "text" not in (info.get("modalities") or [IMAGE]) or kind not in (SOFTMAX, SIGMOID):
        raise ApiError(
            ErrorType.VALIDATION,
            f"the model {model.name!r} cannot classify: it serves no texts (it has no text "
            "tower, or is pooled out of its text space: zero-shot classification needs a CLIP, "
            "SigLIP or SigLIP2 model served with IEI_POOLING=auto)",
        )
    return ZeroShot(str(kind), float(info["logit_scale"]), float(info.get("logit_bias") or 0.0))


def check_labels(
    labels: list[str], template: str, max_labels: int, max_chars: int, prefix: str = ""
) -> None:
    """Refuse, naming the field (`prefix`: `parameters.` in a JSON body): no labels, too many,
    an empty or duplicate one, one over IEI_MAX_TEXT_CHARS, a template without `{}`."""
    field_name = f"{prefix}candidate_labels"
    if not labels:
        raise ApiError(ErrorType.VALIDATION, f"{field_name}: give at least one label")
    if len(labels) > max_labels:
        raise ApiError(
            ErrorType.VALIDATION,
            f"{field_name}: {len(labels)} labels > maximum allowed {max_labels} "
            "(IEI_MAX_CLIENT_BATCH_SIZE)",
        )
    if "{}" not in template:
        raise ApiError(
            ErrorType.VALIDATION,
            f"{prefix}hypothesis_template: {template!r} has no `{{}}` where the label goes",
        )
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if not label.strip():
            raise ApiError(ErrorType.VALIDATION, f"{field_name}[{i}]: empty label")
        if label in seen:
            raise ApiError(
                ErrorType.VALIDATION,
                f"{field_name}[{i}]: {label!r} is given twice (also [{seen[label]}])",
            )
        seen[label] = i
        # counted, not built: a template of many `{}` and a long label would be gigabytes
        length = len(template) + template.count("{}") * (len(label) - 2)
        if length > max_chars:
            raise ApiError(
                ErrorType.VALIDATION,
                f"{field_name}[{i}]: its text of {length} characters (in the template) is "
                f"longer than the limit of {max_chars} characters (IEI_MAX_TEXT_CHARS)",
            )


def hypothesis(template: str, label: str) -> str:
    """The text embedded for `label`; `replace`, not `format`: other braces stay as they are."""
    return template.replace("{}", label)


async def classify(
    images: list[Input],
    labels: list[str],
    template: str,
    services: Services,
    model: ServedModel,
    *,
    prefix: str = "",
) -> tuple[np.ndarray, dict[str, str]]:
    """(N, L) scores of the images against the labels, and the timing headers. The labels'
    vectors not cached yet are embedded at the same time as the images."""
    started = time.perf_counter()
    settings = services.settings
    check_labels(labels, template, settings.max_client_batch_size, settings.max_text_chars, prefix)
    if not images:
        raise ApiError(ErrorType.EMPTY, "`inputs` cannot be empty")
    deadline = asyncio.get_running_loop().time() + settings.request_timeout
    await load_within(services, model, deadline)
    head = zero_shot_of(await services.triton.model_info(model.triton_image), model)
    cache = services.labels
    keys = [(model.name, template, label) for label in labels]
    cached = [cache.get(key) for key in keys]
    missing = [i for i, vector in enumerate(cached) if vector is None]
    calls: list[Awaitable[Embedded]] = [embed_inputs(images, services, started, model=model)]
    if missing:
        texts = [Input(TEXT, hypothesis(template, labels[i])) for i in missing]
        calls.append(embed_inputs(texts, services, started, model=model))
    if len(images) + len(missing) <= settings.max_concurrent_images:
        done = await together(calls)
    else:  # the worker's permits could never hold both at once (a 429 forever): one by one
        done = [await call for call in calls]
    for i, vector in zip(missing, normalize_rows(done[1].vectors) if missing else [], strict=True):
        cache.put(keys[i], vector)
        cached[i] = vector
    scores = head.scores(done[0].vectors, np.stack(cached))  # type: ignore[arg-type]
    return scores, done[0].timing_headers()


def ranked(labels: list[str], scores: np.ndarray) -> list[list[dict[str, object]]]:
    """Per image, `[{"label", "score"}]` by score, highest first (ties in the labels' order)."""
    return [
        [{"label": labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")]
        for row in scores
    ]
