"""Triton Python model `iei`: encoded image files in, embedding vectors out.

Triton loads the model repository alone (in its own container under compose), so nothing here
imports the frontend. The logic lives in `iei_runtime/` beside this model's folder, shared by
the repository's models and unit-tested without Triton; this class only wires it to Triton.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

# Triton puts only this model's own folders on sys.path; the shared code is at the repository's
# top (Triton loads the models it is told to, so that folder is no model of its own).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from iei_runtime.executions import ExecutionClock, clocked
from iei_runtime.loading import describe, engine_line, load_embedder
from iei_runtime.triton import (
    INPUT_NAME,
    gather_inputs,
    show_restarts,
    start_instance,
    vector_responses,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.clock = ExecutionClock().shown(args)
        self.restarts = show_restarts(args, dict(os.environ))
        settings, device, threads = start_instance(args)
        self.logger = pb_utils.Logger
        # Loading runs the first forward pass (it allocates and picks kernels: a warm-up).
        self.embedder = embedder = load_embedder(settings, device, threads)
        self.info = describe(self.embedder, settings, layout="single", jpeg_decoder="pil")
        self.logger.log_info(
            f"iei: {settings.model_id} on {device}, {engine_line(self.embedder)}, "
            f"pooling={self.embedder.encoder.pooling} (IEI_POOLING={settings.pooling}), "
            f"{threads} decode threads, "
            f"images shrunk after decoding {embedder.resize_rule.shrinks_to(embedder.draft_side)}, "
            f"JPEG draft decoding {'on' if self.embedder.jpeg_draft else 'off'}, "
            f"preprocessing by {self.embedder.preprocessing_line()}, "
            f"{self.embedder.budget.capacity} pixels decoded at once at most"
        )

    @clocked  # the launcher's hang check, /health's long executions (iei_runtime/executions.py)
    def execute(self, requests: list[Any]) -> list[Any]:
        blobs, spans = gather_inputs(requests, INPUT_NAME)
        results = self.embedder.embed(blobs)
        return vector_responses(requests, spans, results, self.info)

    def finalize(self) -> None:
        self.clock.close()
        self.embedder.close()
