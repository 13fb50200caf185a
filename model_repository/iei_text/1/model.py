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

from iei_runtime.loading import engine_line, load_text_embedder
from iei_runtime.triton import (
    TEXT_INPUT_NAME,
    TOKENS_OUTPUT_NAME,
    gather_inputs,
    make_response,
    start_instance,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        settings, device, _ = start_instance(args)
        self.embedder = load_text_embedder(settings, device)  # warmed up
        pb_utils.Logger.log_info(
            f"iei_text: {settings.model_id} on {device}, {engine_line(self.embedder)}, "
            f"context {self.embedder.context} tokens, padding={self.embedder.padding}, "
            f"lower-cased here: {self.embedder.lower_case}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        texts, spans = gather_inputs(requests, TEXT_INPUT_NAME)
        results, tokens = self.embedder.embed(texts)
        responses = []
        for span in spans:
            counts = np.asarray(tokens[span.start : span.stop], dtype=np.int32).reshape(-1, 1)
            own = results[span.start : span.stop]
            responses.append(make_response(own, TEXT_INPUT_NAME, {TOKENS_OUTPUT_NAME: counts}))
        return responses
