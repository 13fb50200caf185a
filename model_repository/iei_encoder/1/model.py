"""Triton Python model `iei_encoder`, the split layout's second step (iei/configs/split.pbtxt):
uint8 pixels (or JPEG files) in, embeddings out, on the model's device. The logic is
`iei_runtime/stages.py`; this class wires it to Triton."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # iei_runtime/ (see iei/1/model.py)

from iei_runtime.executions import ExecutionClock, clocked
from iei_runtime.loading import describe, engine_line, load_encode_stage
from iei_runtime.stages import JPEG_HEADER_NAME, JPEG_NAME, PIXELS_NAME
from iei_runtime.triton import FallbackCounter, gather_inputs, start_instance, vector_responses


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.clock = ExecutionClock().shown(args)
        settings, device, threads = start_instance(args)
        self.stage = load_encode_stage(settings, device, threads, FallbackCounter("iei_encoder"))
        embedder = self.stage.embedder
        decoder = self.stage.decoder.name if self.stage.decoder else "pil"
        self.info = describe(embedder, settings, layout="split", jpeg_decoder=decoder)
        pb_utils.Logger.log_info(
            f"iei_encoder: {settings.model_id} on {device}, {engine_line(embedder)}, "
            f"pooling={embedder.encoder.pooling}, plain JPEGs decoded by {decoder}"
        )

    @clocked  # the launcher's hang check, /health's long executions (iei_runtime/executions.py)
    def execute(self, requests: list[Any]) -> list[Any]:
        # PIXELS stays one array per request (a ragged input: (N, 3, 1, 1) placeholders where
        # every image of a request crosses as a JPEG); the stage copies the rows it reads once.
        # A request whose PIXELS or JPEG_HEADER do not fit its JPEG rows fails alone.
        pixels = [pb_utils.get_input_tensor_by_name(r, PIXELS_NAME).as_numpy() for r in requests]
        headers = [
            pb_utils.get_input_tensor_by_name(r, JPEG_HEADER_NAME).as_numpy() for r in requests
        ]
        files, spans = gather_inputs(requests, JPEG_NAME)
        results = self.stage.embed_requests(pixels, files, headers, spans)
        # Errors name IMAGE[i]: the ensemble's input, whose rows these are.
        return vector_responses(requests, spans, results, self.info)

    def finalize(self) -> None:
        self.clock.close()
        self.stage.embedder.close()
