"""Triton Python model `iei_text`: texts in, vectors of the image space out.

Loaded beside `iei` only when the model is a dual encoder (CLIP, SigLIP, SigLIP2): the launcher
decides from the model's config.json with the rule in `iei_runtime/families.py`. Like `iei`, it
never imports the frontend; the logic is in `iei_runtime/texts.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The shared code is at the repository's top (see iei/1/model.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from iei_runtime.executions import ExecutionClock, clocked
from iei_runtime.loading import engine_line, load_text_embedder
from iei_runtime.triton import (
    TEXT_INPUT_NAME,
    TOKENS_OUTPUT_NAME,
    error_response,
    gather_inputs,
    make_response,
    start_instance,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.clock = ExecutionClock().shown(args)
        settings, device, _ = start_instance(args)
        self.embedder = load_text_embedder(settings, device)  # warmed up
        pb_utils.Logger.log_info(
            f"iei_text: {settings.model_id} on {device}, {engine_line(self.embedder)}, "
            f"context {self.embedder.context} tokens, padding={self.embedder.padding}, "
            f"lower-cased here: {self.embedder.lower_case}"
        )

        # Texts the text tower ran (Triton's metrics): a request for TOKENS alone runs none.
        # The family must outlive its metric, so it is kept too.
        self.encoded_family = pb_utils.MetricFamily(
            name="iei_text_tower_texts_total",
            description="Texts run through the text tower (requests for TOKENS alone run none)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.encoded = self.encoded_family.Metric(
            labels={"model": args.get("model_name", "iei_text")}
        )

    @clocked  # the launcher's hang check, /health's long executions (iei_runtime/executions.py)
    def execute(self, requests: list[Any]) -> list[Any]:
        # A request that asks for TOKENS alone (the frontend's check of `truncate: false`
        # before anything is embedded) is only tokenized; every other one is embedded too.
        counting = [set(r.requested_output_names()) == {TOKENS_OUTPUT_NAME} for r in requests]
        embedded = [r for r, count_only in zip(requests, counting, strict=True) if not count_only]
        counted = [r for r, count_only in zip(requests, counting, strict=True) if count_only]
        responses = dict(zip(map(id, embedded), self.embed(embedded), strict=True))
        responses.update(zip(map(id, counted), self.count(counted), strict=True))
        return [responses[id(request)] for request in requests]

    def embed(self, requests: list[Any]) -> list[Any]:
        if not requests:
            return []
        texts, spans = gather_inputs(requests, TEXT_INPUT_NAME)
        results, tokens = self.embedder.embed(texts)
        self.encoded.increment(sum(not isinstance(r, ValueError) for r in results))
        responses = []
        for span in spans:
            counts = np.asarray(tokens[span.start : span.stop], dtype=np.int32).reshape(-1, 1)
            own = results[span.start : span.stop]
            responses.append(make_response(own, TEXT_INPUT_NAME, {TOKENS_OUTPUT_NAME: counts}))
        return responses

    def count(self, requests: list[Any]) -> list[Any]:
        if not requests:
            return []
        texts, spans = gather_inputs(requests, TEXT_INPUT_NAME)
        results, tokens = self.embedder.count(texts)
        responses = []
        for span in spans:
            failed = error_response(results[span.start : span.stop], TEXT_INPUT_NAME)
            counts = np.asarray(tokens[span.start : span.stop], dtype=np.int32).reshape(-1, 1)
            tensor = pb_utils.Tensor(TOKENS_OUTPUT_NAME, counts)
            responses.append(failed or pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses

    def finalize(self) -> None:
        self.clock.close()
